package main

import (
	"path"
	"syscall"

	"flag"
	"fmt"
	"github.com/rerouted/rerouted/internal/connect"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/rerouted/rerouted/internal/control"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy"
)

// cmdExplain shows which rule a new connection from a process would match,
// and why every earlier rule does not: the tool for "why does this leave
// through the wrong ISP?".
func cmdExplain(args []string) int {
	var file, dst, proto string
	var pid int
	flags("explain", args, func(fs *flag.FlagSet) {
		configFlag(fs, &file, "configuration file")
		fs.IntVar(&pid, "pid", 0, "process that would open the connection")
		fs.StringVar(&dst, "dst", "", "destination ADDR:PORT ([ADDR]:PORT for IPv6)")
		fs.StringVar(&proto, "protocol", "tcp", "tcp, udp or icmp (ping; --dst's port is then ignored)")
	})
	p, ok := policy.ParseProtocol(proto)
	if !ok {
		fmt.Fprintf(os.Stderr, "rerouted explain: --protocol %q: want tcp, udp or icmp\n", proto)
		return exitUsage
	}
	cfg, code := loadConfig(file)
	if cfg == nil {
		return code
	}
	ap, err := netip.ParseAddrPort(dst)
	if err != nil || pid <= 0 {
		fmt.Fprintln(os.Stderr, "rerouted explain: --pid PID and --dst ADDR:PORT are required")
		return exitUsage
	}
	f, err := flowOfPID(pid, ap, p)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rerouted explain: %v\n", err)
		return exitFailure
	}
	explain(os.Stdout, cfg, f)
	return exitOK
}

// pidOwner is a process's identity, read once from /proc.
type pidOwner struct {
	proc    owner.Process
	hasProc bool
	cg      string
	hasCg   bool
}

func (o *pidOwner) Process() (owner.Process, bool) { return o.proc, o.hasProc }
func (o *pidOwner) Cgroup() (string, bool)         { return o.cg, o.hasCg }

// flowOfPID describes a connection pid would open: its socket would belong
// to the process's filesystem uid and gid.
func flowOfPID(pid int, dst netip.AddrPort, proto ipproto.Proto) (*policy.Flow, error) {
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return nil, fmt.Errorf("process %d: %w", pid, err)
	}
	f := &policy.Flow{Proto: proto, Dst: dst, HasUID: true}
	for _, line := range strings.Split(string(status), "\n") {
		k, v, _ := strings.Cut(line, ":")
		ids := strings.Fields(v) // real, effective, saved, filesystem
		if len(ids) == 4 && (k == "Uid" || k == "Gid") {
			n, _ := strconv.ParseUint(ids[3], 10, 32)
			if k == "Uid" {
				f.UID = uint32(n)
			} else {
				f.GID = uint32(n)
			}
		}
	}
	o := &pidOwner{}
	o.proc, o.hasProc = owner.NewOwners().ProcessByPID(pid)
	if cg, err := owner.CgroupOfPID(pid); err == nil {
		o.cg, o.hasCg = cg, true
	}
	f.Owner = o
	return f, nil
}

func explain(w io.Writer, cfg *policy.Config, f *policy.Flow) {
	p, _ := f.Owner.Process()
	cg, _ := f.Owner.Cgroup()
	fmt.Fprintf(w, "process %d %q (%s) %s %s cgroup /%s\n", p.PID, p.Comm, p.Exe, policy.IDName("uid", f.UID), policy.IDName("gid", f.GID), cg)
	fmt.Fprintf(w, "new %s connection to %s\n", f.Proto, f.Dst)
	steered := cfg.Daemon.Steering == "connect" && !f.Proto.IsICMP() && explainConnect(w, cfg, f)
	if queued, why := cfg.Prefiltered(f); steered {
		fmt.Fprintf(w, "the daemon never sees it: a steered socket's packets pass the table as they are\n\n")
	} else if queued {
		fmt.Fprintf(w, "the kernel sends its first packet to rerouted: %s\n\n", why)
	} else {
		fmt.Fprintf(w, "the kernel does not send it to rerouted at all: %s", why)
		if cfg.Daemon.HonorMarks {
			fmt.Fprintf(w, " (unless the host's own rules mark it)")
		}
		fmt.Fprintf(w, "\n\n")
	}
	for _, r := range cfg.Rules {
		if why := r.Explain(f); why != "" {
			fmt.Fprintf(w, "  rule %q (%s:%d): no match: %s\n", r.Name, cfg.File, r.Line(), why)
			continue
		}
		fmt.Fprintf(w, "  rule %q (%s:%d): MATCH\n\n=> %s\n", r.Name, cfg.File, r.Line(), r.Action)
		explainUplinks(w, cfg, r, f.Dst.Addr().Is6())
		return
	}
	fmt.Fprintf(w, "\n=> no rule matches: the connection follows the host's routing")
	if cfg.Daemon.HonorMarks {
		fmt.Fprintf(w, ", and a mark the host's own rules set on it is honoured")
	}
	fmt.Fprintln(w)
}

// explainConnect says what the connect-time program would do with f's
// connect(), by the uplink states the running daemon sees (all up if it
// does not answer).
func explainConnect(w io.Writer, cfg *policy.Config, f *policy.Flow) (decided bool) {
	root, err := owner.Cgroup2Mount("/proc/self/mountinfo")
	if err != nil {
		fmt.Fprintf(w, "at connect(): nothing decided (%v): the queue's way, below\n", err)
		return false
	}
	im, err := connect.Compile(cfg, root)
	if err != nil {
		fmt.Fprintf(w, "at connect(): nothing decided (%v): the queue's way, below\n", err)
		return false
	}
	c := connect.Conn{Proto: f.Proto, Dst: f.Dst, UID: f.UID, GID: f.GID}
	if p, ok := f.Owner.Process(); ok {
		c.Comm = p.Comm
	}
	if cg, ok := f.Owner.Cgroup(); ok {
		for p := cg; ; p = path.Dir(p) {
			if p == "." || p == "/" {
				p = ""
			}
			var st syscall.Stat_t
			if syscall.Stat(path.Join(root, p), &st) == nil {
				c.Cgroups = append(c.Cgroups, st.Ino)
			}
			if p == "" {
				break
			}
		}
	}
	up := map[string]bool{}
	ups, qerr := control.QueryUplinks(cfg.Daemon.ControlSocket)
	for _, u := range ups {
		up[u.Uplink+"/"+u.Family] = u.Up
	}
	v := im.Decide(c, func(i int, v6 bool) bool {
		if qerr != nil {
			return true
		}
		return up[im.Uplinks[i]+"/"+map[bool]string{false: "ipv4", true: "ipv6"}[v6]]
	})
	switch {
	case v.Stop:
		fmt.Fprintf(w, "at connect(): rule %q stops the kernel's evaluation (%s): the queue's way, below\n", im.Rules[v.Rule].Name, v.Why)
	case v.Refuse:
		fmt.Fprintf(w, "at connect(): rule %q REFUSES it (every uplink down, on_down = \"drop\"): connect() fails with EPERM\n", im.Rules[v.Rule].Name)
	case v.Uplink >= 0 && v.Balanced:
		names := []string{}
		for _, i := range v.Candidates {
			names = append(names, im.Uplinks[i])
		}
		fmt.Fprintf(w, "at connect(): rule %q binds the socket to the address of one of %v (by weight): nothing is queued or translated\n", im.Rules[v.Rule].Name, names)
	case v.Uplink >= 0:
		fmt.Fprintf(w, "at connect(): rule %q binds the socket to %s's address: nothing is queued or translated\n", im.Rules[v.Rule].Name, im.Uplinks[v.Uplink])
	case v.Rule >= 0:
		fmt.Fprintf(w, "at connect(): rule %q leaves it to the host's routing\n", im.Rules[v.Rule].Name)
	default:
		fmt.Fprintf(w, "at connect(): no rule the kernel decides matches it\n")
	}
	if qerr != nil && v.Uplink >= 0 {
		fmt.Fprintf(w, "   (uplink states unknown, taken as up: %v)\n", qerr)
	}
	return !v.Stop && (v.Uplink >= 0 || v.Refuse)
}

// explainUplinks says, for a rule that picks among uplinks, which of them
// the running daemon sees up now, and so which one a connection would get.
func explainUplinks(w io.Writer, cfg *policy.Config, r *policy.Rule, v6 bool) {
	a := r.Action
	if a.Kind != policy.ActUplink && a.Kind != policy.ActBalance {
		return
	}
	ups, err := control.QueryUplinks(cfg.Daemon.ControlSocket)
	if err != nil {
		fmt.Fprintf(w, "   (uplink states unknown: %v)\n", err)
		return
	}
	family := "ipv4"
	if v6 {
		family = "ipv6"
	}
	state := map[string]control.UplinkInfo{}
	for _, u := range ups {
		if u.Family == family {
			state[u.Uplink] = u
		}
	}
	var upNames []string
	for i, c := range a.Choices {
		st, known := state[c.Name]
		switch {
		case c.Uplink == nil:
			fmt.Fprintf(w, "   %q: the host's routing, always up\n", c.Name)
			upNames = append(upNames, c.Name)
		case !known || st.Up:
			fmt.Fprintf(w, "   %q: up\n", c.Name)
			upNames = append(upNames, c.Name)
		default:
			fmt.Fprintf(w, "   %q: DOWN since %s: %s\n", c.Name, st.Since.Format(time.RFC3339), st.Why)
			if i == 0 && a.Kind == policy.ActUplink {
				fmt.Fprintf(w, "   (the rule's first choice is down)\n")
			}
		}
	}
	switch {
	case len(upNames) == 0 && a.DropWhenDown:
		fmt.Fprintln(w, "=> now: every uplink of the rule is down: the connection is refused (on_down = \"drop\")")
	case len(upNames) == 0:
		fmt.Fprintln(w, "=> now: every uplink of the rule is down: the connection follows the host's routing (on_down = \"default\")")
	case a.Kind == policy.ActBalance:
		fmt.Fprintf(w, "=> now: one of %s, by weight\n", strings.Join(upNames, ", "))
	default:
		fmt.Fprintf(w, "=> now: %s\n", upNames[0])
	}
}
