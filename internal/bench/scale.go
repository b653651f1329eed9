package bench

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/rerouted/rerouted/internal/control"
	"github.com/rerouted/rerouted/internal/networld"
)

// ScaleResult is the daemon's cost with many live flows.
type ScaleResult struct {
	Flows        int           // live flows when measured
	RSS          int64         // daemon's resident memory with the flows, bytes
	RSSListed    int64         // the same after listing them all (`rerouted flows`)
	OpenTime     time.Duration // to open all connections
	SYNEmpty     time.Duration // connect p50 with an empty flow table
	SYNFull      time.Duration // connect p50 with Flows live flows
	RateEmpty    float64       // sequential conn/s, empty table
	RateFull     float64       // sequential conn/s, full table
	ListDuration time.Duration // `rerouted flows` round trip with Flows flows
}

// scalePorts spread the connections over several server ports: one
// destination tuple has only ~64k source ports.
var scalePorts = []uint16{5201, 5202, 5203, 5204}

// Scale opens n connections through rerouted-kernel, keeps them open, and
// measures the daemon's memory and the cost of a new connection.
func (b *run) scale(n int) (ScaleResult, error) {
	r := ScaleResult{}
	if len(b.o.HoldCommand) == 0 {
		return r, errors.New("no command to hold the connections")
	}
	// The servers close at once: the client sockets stay, in CLOSE_WAIT,
	// and so do their flows, while this process holds no descriptor.
	for _, port := range scalePorts {
		if _, err := b.w.ServeFunc(port, func(net.Conn) {}); err != nil {
			return r, err
		}
	}
	sock := filepath.Join(b.dir, "scale.sock")
	cfg := filepath.Join(b.dir, "scale.toml")
	// The host marks them, as rerouted-kernel's traffic: 100,000 flows
	// the kernel decides, each entered in the daemon's table.
	src := fmt.Sprintf("[daemon]\ncontrol_socket = %q\n\n[[uplink]]\nname = \"isp-b\"\nmark = 100\ninterface = \"hb\"\n", sock)
	if err := b.w.Host.Nft("table inet scalemark {\n\tchain output {\n\t\ttype route hook output priority mangle; policy accept;\n\t\ttcp dport { 5003, 5201-5204 } meta mark set 100\n\t}\n}\n"); err != nil {
		return r, err
	}
	defer b.w.Host.Nft("delete table inet scalemark\n")
	if err := os.WriteFile(cfg, []byte(src), 0o600); err != nil {
		return r, err
	}
	d, err := b.w.StartDaemon(b.o.Bin, cfg, nil)
	if err != nil {
		return r, err
	}
	defer d.Stop()
	if err := d.WaitReadyWithin(30 * time.Second); err != nil {
		return r, err
	}
	const probes = 1000
	probe := func() (float64, time.Duration, error) {
		saved := b.o.Conns
		b.o.Conns = probes
		rate, lat, err := b.connections(networld.DialOptions{}, 1)
		b.o.Conns = saved
		return rate, percentile(lat, 50), err
	}
	if r.RateEmpty, r.SYNEmpty, err = probe(); err != nil {
		return r, err
	}

	// Open n connections and keep them: client processes of at most
	// perProcess connections each (a process may have only so many files).
	const perProcess = 15000
	var addrs []string
	for _, p := range scalePorts {
		addrs = append(addrs, netip.AddrPortFrom(networld.ServerAddr, p).String())
	}
	start := time.Now()
	var holders []*exec.Cmd
	var stdins []io.Closer
	defer func() {
		for i, h := range holders {
			stdins[i].Close() // the holder closes its connections and exits
			h.Wait()
		}
	}()
	results := make(chan error)
	for left := n; left > 0; left -= perProcess {
		args := append(b.o.HoldCommand[1:], "-connect", strings.Join(addrs, ","), "-many", strconv.Itoa(min(left, perProcess)))
		cmd := b.w.Host.Command(b.o.HoldCommand[0], args...)
		stdin, err := cmd.StdinPipe()
		if err != nil {
			return r, err
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			return r, err
		}
		if err := cmd.Start(); err != nil {
			return r, err
		}
		holders, stdins = append(holders, cmd), append(stdins, stdin)
		go func() {
			line, err := bufio.NewReader(out).ReadString('\n')
			if err == nil && !strings.HasPrefix(line, "open ") {
				err = errors.New(strings.TrimSpace(line))
			}
			results <- err
		}()
	}
	for range holders {
		err = errors.Join(err, <-results)
	}
	if err != nil {
		return r, err
	}
	r.OpenTime = time.Since(start)
	time.Sleep(3 * time.Second) // a sweep or two with the flows in place
	if r.RSS, err = rss(d.PID()); err != nil {
		return r, err
	}
	t0 := time.Now()
	flows, err := control.QueryFlows(sock)
	r.ListDuration = time.Since(t0)
	if err != nil {
		return r, err
	}
	r.Flows = len(flows)
	flows = nil
	if r.RateFull, r.SYNFull, err = probe(); err != nil {
		return r, err
	}
	r.RSSListed, err = rss(d.PID())
	return r, err
}

// rss reads a process's resident set size.
func rss(pid int) (int64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, errors.New("no VmRSS")
}

// ScaleTable prints the scale measurement.
func ScaleTable(w io.Writer, s ScaleResult) {
	fmt.Fprintf(w, "\nScale, rerouted-kernel with %d live flows (opened in %s; `rerouted flows` lists them in %s):\n\n",
		s.Flows, s.OpenTime.Round(time.Millisecond), s.ListDuration.Round(time.Millisecond))
	fmt.Fprintln(w, "| | empty table | with the live flows |")
	fmt.Fprintln(w, "|---|---|---|")
	fmt.Fprintf(w, "| connect p50 (new connection, sequential) | %d µs | %d µs |\n", s.SYNEmpty.Microseconds(), s.SYNFull.Microseconds())
	fmt.Fprintf(w, "| conn/s sequential | %.0f | %.0f |\n", s.RateEmpty, s.RateFull)
	fmt.Fprintf(w, "| daemon RSS | | %.1f MiB (%.1f MiB right after listing them all) |\n", float64(s.RSS)/(1<<20), float64(s.RSSListed)/(1<<20))
}
