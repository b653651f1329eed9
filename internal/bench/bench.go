// Package bench measures rerouted against the alternatives in one run, in a
// namespace world: the limit (the socket binds ISP B's address itself, so no
// translation is needed), MASQUERADE (the status quo: a host mark rule plus
// conntrack NAT), and rerouted's two datapaths. Paths alternate within each
// round, each round starting one path later (A B C D, B C D A, ...), so
// that drift and order affect them alike; each figure is the median over
// the rounds, and a paired table gives, path by path, the median of its
// ratios to the baselines measured in the same round.
package bench

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
)

// Options configure a run.
type Options struct {
	Bin      string        // the rerouted binary
	Out      io.Writer     // progress and the table
	Rounds   int           // measurements of each path
	BulkTime time.Duration // per direction
	Conns    int           // connections per rate measurement
	Parallel int           // workers for the parallel rate
	Scale    int           // live flows for the scale measurement; 0 skips it
	// HoldCommand runs networld.HoldMany in a process of its own (flags
	// -connect and -many are appended), for the scale measurement.
	HoldCommand []string
	// Paths names the paths to measure; empty: limit, masquerade and both
	// datapaths (see Paths).
	Paths []string
	// Untouched adds the untouched-traffic measurement.
	Untouched bool
	// BusyCommand, if set, runs for the whole measurement: a process that
	// keeps every CPU busy at normal priority, as on a production host.
	BusyCommand []string
}

// Report is what a run measured.
type Report struct {
	Results []Result
	// Rounds are each path's figures round by round (Rounds[i][r] is
	// path Results[i]'s in round r+1), for the paired ratios.
	Rounds    [][]Result
	Scale     *ScaleResult
	Untouched *UntouchedResult
}

// Paths lists the paths a run can measure, and whether each is measured by
// default.
var Paths = []struct {
	Name, About string
	Default     bool
	// Variant: the path this one changes one thing of, to which the
	// paired table compares it.
	Variant string
}{
	{"limit", "the socket binds ISP B's address itself", true, ""},
	{"masquerade", "the host's mark rule and MASQUERADE on ISP B", true, ""},
	{"rerouted-kernel", "the host's mark rule, rerouted with the kernel datapath", true, ""},
	{"rerouted-userspace", "the host's mark rule, rerouted with the userspace datapath", true, ""},
	{"rerouted-rule", "no mark rule: a rerouted rule sends the traffic via ISP B (kernel datapath)", false, ""},
	{"rerouted-balanced", "a rule balances over ISP A and ISP B (1:1), both managed and health-checked every second", false, ""},
	{"rerouted-kernel-nice", "as rerouted-kernel, with the daemon at nice -10 (the example unit's Nice=)", false, "rerouted-kernel"},
	{"rerouted-kernel-noacct", "as rerouted-kernel, without usage accounting ([usage] enabled = false): what accounting costs", false, "rerouted-kernel"},
	{"rerouted-connect", "as rerouted-rule, decided at connect() (steering = \"connect\"): the socket is bound to ISP B's address", false, ""},
}

// Ports of the benchmark servers.
const (
	portUpload   = 5001 // discards what it receives, replies with the count
	portDownload = 5002 // sends until the client closes
	portConnect  = 5003 // accepts and closes: one connection = one handshake
)

// Result is one path's figures (medians over the rounds).
type Result struct {
	Path           string
	Err            error
	UpGbps         float64
	DownGbps       float64
	SeqRate        float64 // connections per second, one at a time
	ParRate        float64 // connections per second, Parallel at a time
	SeqP50, SeqP99 time.Duration
	ParP50, ParP99 time.Duration
}

// path is one way of sending marked traffic out ISP B.
type path struct {
	name string
	// setup prepares the host and returns how to undo it and how clients
	// must dial.
	setup func(b *run) (undo func() error, dial networld.DialOptions, err error)
}

type run struct {
	nice int // the daemon's nice value, for the next setup
	o    Options
	w    *networld.World
	dir  string
	logf func(string, ...any)
}

// Run builds a world, measures every path, prints the table and returns
// the results, and the scale measurement if asked for.
func Run(o Options) (*Report, error) {
	dir, err := os.MkdirTemp("", "rerouted-bench-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	logf := func(f string, a ...any) { fmt.Fprintf(o.Out, f+"\n", a...) }
	w, err := networld.New(fmt.Sprintf("rrbench%d", os.Getpid()), logf)
	if err != nil {
		return nil, err
	}
	defer w.Close()
	b := &run{o: o, w: w, dir: dir, logf: logf}
	if err := b.servers(); err != nil {
		return nil, err
	}
	if len(o.BusyCommand) > 0 {
		busy := exec.Command(o.BusyCommand[0], o.BusyCommand[1:]...)
		if err := busy.Start(); err != nil {
			return nil, fmt.Errorf("busy host: %w", err)
		}
		defer func() { busy.Process.Kill(); busy.Wait() }()
		logf("busy host: %d threads spinning at normal priority (pid %d)", runtime.NumCPU(), busy.Process.Pid)
	}
	// Many short connections: let the host reuse TIME_WAIT ports.
	if err := w.Host.Sysctl("net.ipv4.tcp_tw_reuse=1", "net.ipv4.ip_local_port_range=1024 65000"); err != nil {
		return nil, err
	}

	all := map[string]func(*run) (func() error, networld.DialOptions, error){
		"limit":                  setupLimit,
		"masquerade":             setupMasquerade,
		"rerouted-kernel":        b.setupRerouted("kernel", "", true),
		"rerouted-userspace":     b.setupRerouted("userspace", "", true),
		"rerouted-rule":          b.setupRerouted("kernel", ruleViaB, false),
		"rerouted-balanced":      b.setupRerouted("kernel", balanced, false),
		"rerouted-connect":       b.setupReroutedWith("kernel", "steering = \"connect\"\n", ruleViaB, false),
		"rerouted-kernel-noacct": b.setupRerouted("kernel", "\n[usage]\nenabled = false\n", true),
		"rerouted-kernel-nice": func(b *run) (func() error, networld.DialOptions, error) {
			b.nice = -10
			defer func() { b.nice = 0 }()
			return b.setupRerouted("kernel", "", true)(b)
		},
	}
	var paths []path
	for _, p := range Paths {
		if (len(o.Paths) == 0 && p.Default) || slices.Contains(o.Paths, p.Name) {
			paths = append(paths, path{p.Name, all[p.Name]})
		}
	}
	for _, n := range o.Paths {
		if all[n] == nil {
			return nil, fmt.Errorf("no path %q", n)
		}
	}
	samples := make([][]Result, len(paths))
	for round := 1; round <= o.Rounds; round++ {
		// Each round starts one path later, so that no path always follows
		// the same one (the masquerade path leaves conntrack state behind).
		for k := range paths {
			i := (k + round - 1) % len(paths)
			p := paths[i]
			logf("round %d/%d: %s", round, o.Rounds, p.name)
			r := b.measure(p)
			if r.Err != nil {
				logf("  %s: %v", p.name, r.Err)
			}
			samples[i] = append(samples[i], r)
		}
	}
	results := make([]Result, len(paths))
	for i := range paths {
		results[i] = median(samples[i])
	}
	Table(o.Out, results)
	PairedTable(o.Out, results, samples)
	rep := &Report{Results: results, Rounds: samples}
	if o.Untouched {
		logf("\nuntouched traffic")
		u, err := b.untouched()
		if err != nil {
			return rep, fmt.Errorf("untouched traffic: %w", err)
		}
		UntouchedTable(o.Out, u)
		rep.Untouched = &u
	}
	if o.Scale > 0 {
		logf("\nscale: %d live flows through rerouted-kernel", o.Scale)
		s, err := b.scale(o.Scale)
		if err != nil {
			return rep, fmt.Errorf("scale: %w", err)
		}
		ScaleTable(o.Out, s)
		rep.Scale = &s
	}
	return rep, nil
}

func (b *run) servers() error {
	// The connection server closes first, so it, not the client, holds
	// each connection in TIME_WAIT. The paths share the client's address
	// on ISP B, and a path that picks its port at connect() (every one
	// but the limit, which binds its port) walks the same ports another
	// path walked seconds before. A SYN that meets the other path's
	// TIME_WAIT with a sequence number and timestamps derived from another
	// tuple (a translated connection's are its original tuple's) is not
	// taken and waits a second for its retransmission; a handful of
	// those made one path's rate depend on which path ran before it. The
	// server keeps no TIME_WAIT here: what is measured is the client's path.
	if err := b.w.Net.Sysctl("net.ipv4.tcp_max_tw_buckets=0"); err != nil {
		return err
	}
	chunk := make([]byte, 256<<10)
	handlers := map[uint16]func(net.Conn){
		portUpload: func(c net.Conn) {
			n, _ := io.CopyBuffer(io.Discard, c, make([]byte, 256<<10))
			fmt.Fprintf(c, "%d\n", n)
		},
		portDownload: func(c net.Conn) {
			for {
				if _, err := c.Write(chunk); err != nil {
					return
				}
			}
		},
		portConnect: func(c net.Conn) {},
	}
	for port, h := range handlers {
		l, err := b.w.ServeFunc(port, h)
		if err != nil {
			return err
		}
		_ = l // closed with the world's namespace
	}
	return nil
}

// markRule is the host's own rule that sends the benchmark's traffic to
// ISP B: the setting in which the problem arises.
const markRule = `table inet benchmark {
	chain output {
		type route hook output priority mangle; policy accept;
		tcp dport { 5001, 5002, 5003 } meta mark set 100
	}
}
`

func setupLimit(b *run) (func() error, networld.DialOptions, error) {
	return func() error { return nil }, networld.DialOptions{Bind: networld.HostB}, nil
}

func setupMasquerade(b *run) (func() error, networld.DialOptions, error) {
	nat := markRule + `table ip benchnat {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		oifname "hb" masquerade
	}
}
`
	if err := b.w.Host.Nft(nat); err != nil {
		return nil, networld.DialOptions{}, err
	}
	undo := func() error {
		return b.w.Host.Nft("delete table inet benchmark\ndelete table ip benchnat\n")
	}
	return undo, networld.DialOptions{}, nil
}

// ruleViaB sends the benchmark's ports via ISP B by a rule, not a mark.
const ruleViaB = `
[[rule]]
name = "bench"
uplink = "isp-b"
dport = [5001, 5002, 5003]
`

// balanced spreads the benchmark's connections over ISP A and ISP B, both
// probed every second.
const balanced = `
[uplink.health]
targets = ["192.0.2.80", "tcp:192.0.2.80:5003"]
interval = "1s"
timeout = "500ms"

[[uplink]]
name = "isp-a"
mark = 200
interface = "ha"
gateway = "198.51.100.1"
table = 200
[uplink.health]
targets = ["192.0.2.80", "tcp:192.0.2.80:5003"]
interval = "1s"
timeout = "500ms"

[[rule]]
name = "bench"
balance = { "isp-a" = 1, "isp-b" = 1 }
dport = [5001, 5002, 5003]
`

// setupRerouted runs the daemon with the given datapath, extra
// configuration after ISP B's [[uplink]], and with or without the host's
// mark rule.
func (b *run) setupRerouted(datapath, extra string, mark bool) func(*run) (func() error, networld.DialOptions, error) {
	return b.setupReroutedWith(datapath, "steering = \"queue\"\n", extra, mark)
}

// setupReroutedWith is setupRerouted with more [daemon] settings.
func (b *run) setupReroutedWith(datapath, daemonExtra, extra string, mark bool) func(*run) (func() error, networld.DialOptions, error) {
	return func(*run) (func() error, networld.DialOptions, error) {
		cfg := filepath.Join(b.dir, "rerouted-"+datapath+".toml")
		src := fmt.Sprintf("[daemon]\n"+daemonExtra+"control_socket = %q\ndatapath = %q\n\n[[uplink]]\nname = \"isp-b\"\nmark = 100\ninterface = \"hb\"\n",
			filepath.Join(b.dir, datapath+".sock"), datapath) + extra
		if err := os.WriteFile(cfg, []byte(src), 0o600); err != nil {
			return nil, networld.DialOptions{}, err
		}
		rules := "table inet benchmark {\n}\n" // emptied on undo either way
		if mark {
			rules = markRule
		}
		if err := b.w.Host.Nft(rules); err != nil {
			return nil, networld.DialOptions{}, err
		}
		d, err := b.w.StartDaemon(b.o.Bin, cfg, nil)
		if err == nil {
			err = d.WaitReadyWithin(30 * time.Second)
		}
		if err == nil && b.nice != 0 {
			err = renice(d.PID(), b.nice)
		}
		if err == nil {
			err = b.settle(d.PID())
		}
		undo := func() error {
			var errs []error
			if d != nil {
				if err := d.Stop(); err != nil {
					errs = append(errs, fmt.Errorf("stop the daemon: %w: %s", err, lastLine(d.Output())))
				}
				for _, l := range d.Lines() {
					if strings.Contains(l, "msg=stopping") {
						b.logf("  daemon: %s", l[strings.Index(l, "msg=stopping")+len("msg=stopping "):])
					}
				}
			}
			if err := b.w.Host.Nft("delete table inet benchmark\n"); err != nil {
				errs = append(errs, fmt.Errorf("delete table inet benchmark: %w", err))
			}
			return errors.Join(errs...)
		}
		if err != nil {
			out := ""
			if d != nil {
				out = lastLine(d.Output())
			}
			undo()
			return nil, networld.DialOptions{}, fmt.Errorf("daemon: %v %s", err, out)
		}
		return undo, networld.DialOptions{}, nil
	}
}

// settle waits until a daemon that has said it is ready is idle: what it
// may still do then (the collection of its start's garbage, its first
// reads) is not what a daemon that runs for days costs. Idle: at most one
// clock tick of CPU time in a quarter of a second. (On this project's VM
// the daemon was idle within the first quarter in 29 of 30 starts.)
func (b *run) settle(pid int) error {
	const window, most = 250 * time.Millisecond, 10 * time.Second
	start := time.Now()
	last, err := cpuTicks(pid)
	if err != nil {
		return err
	}
	for time.Since(start) < most {
		time.Sleep(window)
		now, err := cpuTicks(pid)
		if err != nil {
			return err
		}
		if now-last <= 1 {
			if d := time.Since(start); d > 2*window {
				b.logf("  the daemon was idle %s after it was ready", d.Round(10*time.Millisecond))
			}
			return nil
		}
		last = now
	}
	b.logf("  the daemon was still busy %s after it was ready: measured anyway", most)
	return nil
}

// cpuTicks is the CPU time, user and system, in clock ticks, of a process
// and its descendants: a --rerouted wrapper that does not exec the daemon
// has it as a child.
func cpuTicks(pid int) (uint64, error) {
	n, err := ownTicks(pid)
	if err != nil {
		return 0, err
	}
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue // the thread ended
		}
		for _, c := range strings.Fields(string(b)) {
			child, err := strconv.Atoi(c)
			if err != nil {
				continue
			}
			if m, err := cpuTicks(child); err == nil { // a child may end meanwhile
				n += m
			}
		}
	}
	return n, nil
}

// ownTicks is one process's CPU time, user and system, in clock ticks.
func ownTicks(pid int) (uint64, error) {
	st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The fields after the command (in parentheses, which may hold
	// spaces): state is field 3, utime 14, stime 15.
	f := strings.Fields(string(st[bytes.LastIndexByte(st, ')')+1:]))
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %q", pid, st)
	}
	u, err1 := strconv.ParseUint(f[11], 10, 64)
	s, err2 := strconv.ParseUint(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	return u + s, nil
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	return s[strings.LastIndexByte(s, '\n')+1:]
}

// measure runs every measurement on one path.
func (b *run) measure(p path) Result {
	r := Result{Path: p.name}
	undo, dial, err := p.setup(b)
	if err != nil {
		r.Err = err
		return r
	}
	defer func() {
		if err := undo(); err != nil {
			b.logf("  undo %s: %v", p.name, err)
		}
	}()
	if r.UpGbps, err = b.upload(dial); err != nil {
		r.Err = fmt.Errorf("upload: %w", err)
		return r
	}
	if r.DownGbps, err = b.download(dial); err != nil {
		r.Err = fmt.Errorf("download: %w", err)
		return r
	}
	var lat []time.Duration
	if r.SeqRate, lat, err = b.connections(dial, 1); err != nil {
		r.Err = fmt.Errorf("sequential connections: %w", err)
		return r
	}
	r.SeqP50, r.SeqP99 = percentile(lat, 50), percentile(lat, 99)
	if r.ParRate, lat, err = b.connections(dial, b.o.Parallel); err != nil {
		r.Err = fmt.Errorf("parallel connections: %w", err)
		return r
	}
	r.ParP50, r.ParP99 = percentile(lat, 50), percentile(lat, 99)
	b.logf("  up %.2f Gbit/s, down %.2f Gbit/s, %.0f conn/s sequential, %.0f conn/s x%d",
		r.UpGbps, r.DownGbps, r.SeqRate, r.ParRate, b.o.Parallel)
	return r
}

// dialIn dials from the host on the calling goroutine, which must be
// running inside the host namespace (see networld.NS.Do).
func dialIn(o networld.DialOptions, port uint16) (*net.TCPConn, error) {
	d := net.Dialer{Timeout: 5 * time.Second}
	if o.Bind.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: o.Bind.AsSlice()}
	}
	c, err := d.Dial("tcp4", netip.AddrPortFrom(networld.ServerAddr, port).String())
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

func (b *run) upload(o networld.DialOptions) (float64, error) {
	var gbps float64
	err := b.w.Host.Do(func() error {
		c, err := dialIn(o, portUpload)
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 256<<10)
		start := time.Now()
		var sent int64
		for time.Since(start) < b.o.BulkTime {
			n, err := c.Write(buf)
			sent += int64(n)
			if err != nil {
				return err
			}
		}
		c.CloseWrite()
		var got int64
		if _, err := fmt.Fscan(c, &got); err != nil {
			return fmt.Errorf("reading the server's count: %w", err)
		}
		if got != sent {
			return fmt.Errorf("server received %d of %d bytes", got, sent)
		}
		gbps = float64(got) * 8 / time.Since(start).Seconds() / 1e9
		return nil
	})
	return gbps, err
}

func (b *run) download(o networld.DialOptions) (float64, error) {
	var gbps float64
	err := b.w.Host.Do(func() error {
		c, err := dialIn(o, portDownload)
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 256<<10)
		start := time.Now()
		var got int64
		for time.Since(start) < b.o.BulkTime {
			n, err := c.Read(buf)
			got += int64(n)
			if err != nil {
				return err
			}
		}
		gbps = float64(got) * 8 / time.Since(start).Seconds() / 1e9
		return nil
	})
	return gbps, err
}

// connections makes Conns connections, workers at a time, each a full
// handshake and close, and returns the rate and every connect latency.
func (b *run) connections(o networld.DialOptions, workers int) (float64, []time.Duration, error) {
	per := b.o.Conns / workers
	lats := make([][]time.Duration, workers)
	errs := make(chan error, workers)
	start := time.Now()
	for i := 0; i < workers; i++ {
		go func(i int) {
			errs <- b.w.Host.Do(func() error {
				buf := make([]byte, 16)
				for j := 0; j < per; j++ {
					t0 := time.Now()
					c, err := dialIn(o, portConnect)
					if err != nil {
						return err
					}
					lats[i] = append(lats[i], time.Since(t0))
					c.Read(buf) // the server closes first: no TIME_WAIT here
					c.Close()
				}
				return nil
			})
		}(i)
	}
	var err error
	for i := 0; i < workers; i++ {
		err = errors.Join(err, <-errs)
	}
	elapsed := time.Since(start)
	all := slices.Concat(lats...)
	return float64(len(all)) / elapsed.Seconds(), all, err
}

func percentile(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

// median takes, figure by figure, the median over the rounds that worked.
func median(rs []Result) Result {
	out := Result{Path: rs[0].Path}
	var ok []Result
	for _, r := range rs {
		if r.Err == nil {
			ok = append(ok, r)
		} else {
			out.Err = r.Err
		}
	}
	if len(ok) == 0 {
		return out
	}
	out.Err = nil
	mf := func(f func(Result) float64) float64 {
		v := make([]float64, len(ok))
		for i, r := range ok {
			v[i] = f(r)
		}
		slices.Sort(v)
		return v[len(v)/2]
	}
	md := func(f func(Result) time.Duration) time.Duration {
		return time.Duration(mf(func(r Result) float64 { return float64(f(r)) }))
	}
	out.UpGbps = mf(func(r Result) float64 { return r.UpGbps })
	out.DownGbps = mf(func(r Result) float64 { return r.DownGbps })
	out.SeqRate = mf(func(r Result) float64 { return r.SeqRate })
	out.ParRate = mf(func(r Result) float64 { return r.ParRate })
	out.SeqP50 = md(func(r Result) time.Duration { return r.SeqP50 })
	out.SeqP99 = md(func(r Result) time.Duration { return r.SeqP99 })
	out.ParP50 = md(func(r Result) time.Duration { return r.ParP50 })
	out.ParP99 = md(func(r Result) time.Duration { return r.ParP99 })
	return out
}

// renice sets the nice value of every thread of a process (a Go process's
// threads each have their own; new ones inherit their creator's).
func renice(pid, nice int) error {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return err
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := syscall.Setpriority(syscall.PRIO_PROCESS, tid, nice); err != nil {
			return fmt.Errorf("setpriority %d: %w", tid, err)
		}
	}
	return nil
}
