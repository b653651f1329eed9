package main

import (
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/rerouted/rerouted/daemon"
	"github.com/rerouted/rerouted/policy"
	"github.com/rerouted/rerouted/sockdiag"
)

// cmdExplain shows which rule a new connection from a process would match,
// and why every earlier rule does not: the tool for "why does this leave
// through the wrong ISP?".
func cmdExplain(args []string) int {
	var file, dst, proto string
	var pid int
	flags("explain", args, func(fs *flag.FlagSet) {
		fs.StringVar(&file, "config", "", "configuration file")
		fs.IntVar(&pid, "pid", 0, "process that would open the connection")
		fs.StringVar(&dst, "dst", "", "destination ADDR:PORT ([ADDR]:PORT for IPv6)")
		fs.StringVar(&proto, "protocol", "tcp", "tcp, udp or icmp (ping; --dst's port is then ignored)")
	})
	if proto != "tcp" && proto != "udp" && proto != "icmp" {
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
	f, err := flowOfPID(pid, ap, proto)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rerouted explain: %v\n", err)
		return exitFailure
	}
	explain(os.Stdout, cfg, f)
	return exitOK
}

// pidOwner is a process's identity, read once from /proc.
type pidOwner struct {
	proc    policy.Process
	hasProc bool
	cg      string
	hasCg   bool
}

func (o *pidOwner) Process() (policy.Process, bool) { return o.proc, o.hasProc }
func (o *pidOwner) Cgroup() (string, bool)          { return o.cg, o.hasCg }

// flowOfPID describes a connection pid would open: its socket would belong
// to the process's filesystem uid and gid.
func flowOfPID(pid int, dst netip.AddrPort, proto string) (*policy.Flow, error) {
	status, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return nil, fmt.Errorf("process %d: %w", pid, err)
	}
	f := &policy.Flow{Protocol: proto, Dst: dst, HasUID: true}
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
	if p, ok := sockdiag.NewOwners().ProcessByPID(pid); ok {
		o.proc, o.hasProc = policy.Process{PID: p.PID, Comm: p.Comm, Exe: p.Exe}, true
	}
	if cg, err := sockdiag.CgroupOfPID(pid); err == nil {
		o.cg, o.hasCg = cg, true
	}
	f.Owner = o
	return f, nil
}

func explain(w io.Writer, cfg *policy.Config, f *policy.Flow) {
	p, _ := f.Owner.Process()
	cg, _ := f.Owner.Cgroup()
	fmt.Fprintf(w, "process %d %q (%s) %s %s cgroup /%s\n", p.PID, p.Comm, p.Exe, policy.IDName("uid", f.UID), policy.IDName("gid", f.GID), cg)
	fmt.Fprintf(w, "new %s connection to %s\n", f.Protocol, f.Dst)
	if queued, why := cfg.Prefiltered(f); queued {
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

// explainUplinks says, for a rule that picks among uplinks, which of them
// the running daemon sees up now, and so which one a connection would get.
func explainUplinks(w io.Writer, cfg *policy.Config, r *policy.Rule, v6 bool) {
	a := r.Action
	if a.Kind != policy.ActUplink && a.Kind != policy.ActBalance {
		return
	}
	ups, err := daemon.QueryUplinks(cfg.Daemon.ControlSocket)
	if err != nil {
		fmt.Fprintf(w, "   (uplink states unknown: %v)\n", err)
		return
	}
	family := "ipv4"
	if v6 {
		family = "ipv6"
	}
	state := map[string]daemon.UplinkInfo{}
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
