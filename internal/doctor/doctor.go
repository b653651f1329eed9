// Package doctor checks a host for what breaks multi-ISP setups and
// rerouted's translation, and says how to fix each problem: strict
// reverse-path filtering on an uplink, a mark without an ip rule or with an
// empty table, no rule answering an uplink's address through it, a
// MASQUERADE or SNAT on an uplink (in nftables, iptables-nft included, or in
// iptables-legacy), missing NFQUEUE or nftables support (a kernel feature
// the table needs, or the module that provides it), and a configuration
// file users other than root can change.
package doctor

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/rerouted/rerouted/internal/connect"
	"github.com/rerouted/rerouted/internal/filesafety"
	"github.com/rerouted/rerouted/internal/nftdp/nftfeat"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/queue"
	"github.com/rerouted/rerouted/internal/uplink"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Finding is one problem and its fix.
type Finding struct {
	Problem string
	Fix     string
}

// Report is the outcome of a check: what is fine, what is worth knowing
// but works as documented (notes), and what is not fine (findings).
type Report struct {
	OK       []string
	Notes    []string
	Findings []Finding
}

func (r *Report) ok(format string, a ...any) { r.OK = append(r.OK, fmt.Sprintf(format, a...)) }

func (r *Report) note(format string, a ...any) { r.Notes = append(r.Notes, fmt.Sprintf(format, a...)) }

func (r *Report) problem(fix, format string, a ...any) {
	r.Findings = append(r.Findings, Finding{Problem: fmt.Sprintf(format, a...), Fix: fix})
}

// Options adjust a check.
type Options struct {
	// DaemonRunning: rerouted holds the queues, so binding them is not
	// tried (it would fail).
	DaemonRunning bool
	// ProcSys is where /proc/sys is; tests may point elsewhere.
	ProcSys string
	// ProcNet is where /proc/net is; tests may point elsewhere.
	ProcNet string
}

// Check inspects the host (the caller's network namespace) for cfg.
func Check(cfg *policy.Config, o Options) (*Report, error) {
	if o.ProcSys == "" {
		o.ProcSys = "/proc/sys"
	}
	if o.ProcNet == "" {
		o.ProcNet = "/proc/net"
	}
	r := &Report{}
	checkConfigFile(r, cfg.File)
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("rtnetlink: %w", err)
	}
	defer h.Close()

	checkNetfilter(r, cfg, o)
	checkSteering(r, cfg, probeSteering)
	rules := map[int][]netlink.Rule{}
	for _, f := range []int{unix.AF_INET, unix.AF_INET6} {
		if rules[f], err = h.RuleList(f); err != nil {
			return nil, fmt.Errorf("list ip rules: %w", err)
		}
	}
	ups := resolveInterfaces(r, h, rules, cfg.Uplinks)
	for _, u := range ups {
		checkUplink(r, h, rules, u, o)
	}
	if err := checkUplinkStates(r, h, cfg); err != nil {
		return nil, err
	}
	if err := checkNAT(r, ups); err != nil {
		r.problem("check that nf_tables is available (modprobe nf_tables)", "cannot read the nftables ruleset: %v", err)
	}
	checkLegacyNAT(r, ups, o)
	return r, nil
}

// checkSteering says whether steering = "connect" can work here. Where it
// cannot, the daemon decides every flow at the queue, as documented: under
// the default that is a note; written in the file, it is a problem.
func checkSteering(r *Report, cfg *policy.Config, probe func(*policy.Config) (string, error)) {
	if cfg.Daemon.Steering != "connect" {
		return
	}
	root, err := probe(cfg)
	switch {
	case err == nil:
		r.ok("steering = \"connect\": the connect-time program loads, cgroup v2 at %s", root)
	case cfg.Daemon.SteeringSet:
		r.problem("set steering = \"queue\", or use a kernel with cgroup v2 and Linux 5.14 or later; meanwhile every flow is decided at the queue",
			"steering = \"connect\" cannot work here: %v", err)
	default:
		r.note("connect-time steering (the default, steering = \"connect\") cannot work here, so every flow is decided at the queue, which works; it needs cgroup v2 and Linux 5.14 or later: %v", err)
	}
}

// probeSteering loads the connect-time program for cfg, and returns the
// cgroup v2 mount it would attach at.
func probeSteering(cfg *policy.Config) (string, error) {
	root, err := owner.Cgroup2Mount("/proc/self/mountinfo")
	if err == nil {
		_, err = connect.Compile(cfg, root)
	}
	if err == nil {
		err = connect.Probe()
	}
	return root, err
}

// resolveInterfaces returns the uplinks as the checks see them: one without
// an interface set takes the interface of the default route in the table
// its mark leads to, so that its reverse-path filter, address rules and NAT
// are checked all the same.
func resolveInterfaces(r *Report, h *netlink.Handle, rules map[int][]netlink.Rule, uplinks []*policy.Uplink) []*policy.Uplink {
	out := make([]*policy.Uplink, len(uplinks))
	for i, u := range uplinks {
		out[i] = u
		if u.Interface != "" {
			continue
		}
		dev, table, ip := interfaceOfTable(h, rules, u.Mark)
		if dev == "" {
			r.ok("uplink %q: no interface set, and no default route in a table its mark leads to names one, so its reverse-path filter and address rules are not checked", u.Name)
			continue
		}
		r.ok("uplink %q: no interface set; checked as %s, where the default route of %s table %d leaves", u.Name, dev, ip, table)
		c := *u
		c.Interface = dev
		out[i] = &c
	}
	return out
}

// interfaceOfTable finds the interface of the default route in the table
// fwmark mark leads to, IPv4's first, then IPv6's.
func interfaceOfTable(h *netlink.Handle, rules map[int][]netlink.Rule, mark uint32) (dev string, table int, ip string) {
	for _, fam := range []struct {
		family int
		ip     string
	}{{unix.AF_INET, "ip"}, {unix.AF_INET6, "ip -6"}} {
		t := markTable(rules[fam.family], mark)
		if t == 0 {
			continue
		}
		routes, err := h.RouteListFiltered(fam.family, &netlink.Route{Table: t}, netlink.RT_FILTER_TABLE)
		if err != nil {
			continue
		}
		for _, rt := range routes {
			if rt.Dst != nil {
				if ones, _ := rt.Dst.Mask.Size(); ones != 0 {
					continue
				}
			}
			index := rt.LinkIndex
			if index == 0 && len(rt.MultiPath) > 0 {
				index = rt.MultiPath[0].LinkIndex
			}
			if link, err := h.LinkByIndex(index); err == nil {
				return link.Attrs().Name, t, fam.ip
			}
		}
	}
	return "", 0, ""
}

// markTable is the table the first ip rule for fwmark mark leads to; 0 if
// none does.
func markTable(rules []netlink.Rule, mark uint32) int {
	for _, ru := range rules {
		if ru.Mark == mark && ru.Table != 0 && !ru.Invert {
			return ru.Table
		}
	}
	return 0
}

// checkConfigFile: rerouted run refuses a configuration file users other
// than root can change (unless --insecure-config).
func checkConfigFile(r *Report, file string) {
	if file == "" { // a configuration not read from a file
		return
	}
	err := filesafety.Check(file)
	var ie *filesafety.InsecureFileError
	switch {
	case errors.As(err, &ie):
		r.problem(ie.Fix(), "%s", ie.Problem())
	case err != nil:
		r.problem("check the path, or run doctor as root", "%v", err)
	default:
		r.ok("configuration file %s: only root can change it", file)
	}
}

// checkNetfilter: nftables answers, and the queues can be bound.
func checkNetfilter(r *Report, cfg *policy.Config, o Options) {
	c, err := nftables.New()
	if err == nil {
		_, err = c.ListTables()
		c.CloseLasting()
	}
	if err != nil {
		r.problem("load nf_tables (modprobe nf_tables) or use a kernel built with CONFIG_NF_TABLES",
			"nftables does not answer: %v", err)
	} else {
		r.ok("nftables answers")
		checkKernelFeatures(r)
	}
	if o.DaemonRunning {
		r.ok("rerouted is running and holds its queues")
		return
	}
	first, n := cfg.Daemon.Queue, uint16(cfg.Daemon.Queues)
	for i := uint16(0); i < n; i++ {
		q, err := queue.Open(first+i, queue.Options{Rcvbuf: 64 << 10})
		if err != nil {
			fix := "load nfnetlink_queue (modprobe nfnetlink_queue) or use a kernel with CONFIG_NETFILTER_NETLINK_QUEUE"
			if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EBUSY) {
				// The kernel answers EPERM for a queue bound by another
				// socket (and for a caller without CAP_NET_ADMIN).
				fix = fmt.Sprintf("another program holds NFQUEUE %d (see /proc/net/netfilter/nfnetlink_queue): set [daemon] queue to a free number; or run doctor as root", first+i)
			}
			r.problem(fix, "NFQUEUE %d cannot be bound: %v", first+i, err)
			return
		}
		q.Close()
	}
	r.ok("NFQUEUE %d-%d can be bound", first, first+n-1)
}

// checkKernelFeatures: the kernel has every nftables feature the table
// uses, built in or as a module that loads (nftfeat.Probe tries each in a
// scratch table).
func checkKernelFeatures(r *Report) {
	missing, queue, err := nftfeat.Probe()
	if err != nil {
		r.problem("run doctor as root", "cannot probe the kernel's nftables features: %v", err)
		return
	}
	for _, f := range missing {
		fix := fmt.Sprintf("use a kernel of Linux %s or later built with it", f.Since)
		if len(f.Modules) > 0 {
			fix = fmt.Sprintf("load the module (modprobe %s; to load it at boot: echo %s >/etc/modules-load.d/rerouted.conf), or %s",
				f.Modules[0], f.Modules[0], fix)
		}
		r.problem(fix, "the kernel lacks %s: rerouted cannot install its table", f)
	}
	switch queue {
	case nftfeat.QueueNative:
		r.ok("new flows reach the daemon through the nft queue statement")
	case nftfeat.QueueXT:
		r.ok("new flows reach the daemon through the xtables NFQUEUE target (this kernel has no nft queue statement: module nft_queue)")
	}
	if len(missing) == 0 {
		r.ok("the kernel has every nftables feature rerouted uses")
	}
	// Host marks: decided by the kernel itself, or at the queue.
	lacks, err := nftfeat.ProbeKernelDecisions()
	switch {
	case err != nil:
		r.problem("run doctor as root", "cannot probe the kernel's nftables features: %v", err)
	case len(lacks) == 0:
		r.ok("host-marked flows are decided by the kernel itself (host_marks = \"kernel\")")
	default:
		var names []string
		for _, f := range lacks {
			names = append(names, f.String())
		}
		r.ok("host-marked flows are decided at the queue, as other new flows: the kernel lacks %s", strings.Join(names, "; "))
	}
}

func checkUplink(r *Report, h *netlink.Handle, rules map[int][]netlink.Rule, u *policy.Uplink, o Options) {
	var link netlink.Link
	if u.Interface != "" {
		var err error
		if link, err = h.LinkByName(u.Interface); err != nil {
			r.problem(fmt.Sprintf("fix interface = %q in the configuration", u.Interface), "uplink %q: interface %q does not exist", u.Name, u.Interface)
			return
		}
		checkRPFilter(r, u, o)
	}
	if u.Managed() {
		r.ok("uplink %q: rerouted installs its route and rules (table %d)", u.Name, u.Table)
		return
	}
	for _, fam := range []struct {
		family int
		ip     string // the ip command's flag, for the fixes
	}{{unix.AF_INET, "ip"}, {unix.AF_INET6, "ip -6"}} {
		// IPv6 is checked where the uplink has IPv6 addresses.
		var addrs []netlink.Addr
		if link != nil {
			all, err := h.AddrList(link, fam.family)
			if err != nil {
				r.problem("check the interface", "uplink %q: addresses of %s: %v", u.Name, u.Interface, err)
				continue
			}
			for _, a := range all {
				if a.IP.IsGlobalUnicast() {
					addrs = append(addrs, a)
				}
			}
		}
		if fam.family == unix.AF_INET6 && len(addrs) == 0 {
			continue
		}
		checkMarkRoute(r, h, rules[fam.family], u, fam.family, fam.ip)
		checkFromRules(r, rules[fam.family], u, addrs, fam.ip)
	}
}

// checkMarkRoute: the uplink's mark leads to a table, and the table has
// routes.
func checkMarkRoute(r *Report, h *netlink.Handle, rules []netlink.Rule, u *policy.Uplink, family int, ip string) {
	table := markTable(rules, u.Mark)
	if table == 0 {
		r.problem(fmt.Sprintf("%s rule add fwmark %d lookup <its table> (or set gateway and table on the uplink and let rerouted do it)", ip, u.Mark),
			"uplink %q: no %s rule sends fwmark %d to a routing table, so marked traffic follows the main table", u.Name, ip, u.Mark)
		return
	}
	routes, err := h.RouteListFiltered(family, &netlink.Route{Table: table}, netlink.RT_FILTER_TABLE)
	if err != nil || len(routes) == 0 {
		r.problem(fmt.Sprintf("%s route add default via <gateway> dev <interface> table %d", ip, table),
			"uplink %q: fwmark %d leads to %s table %d, which has no routes", u.Name, u.Mark, ip, table)
		return
	}
	r.ok("uplink %q: fwmark %d leads to %s table %d (%d routes)", u.Name, u.Mark, ip, table, len(routes))
}

// checkRPFilter: strict reverse-path filtering on an uplink drops the
// replies of translated flows (their destination is restored before the
// routing decision, and the socket's address routes through another
// uplink). The effective value is the larger of "all" and the interface's.
func checkRPFilter(r *Report, u *policy.Uplink, o Options) {
	read := func(dev string) int {
		b, err := os.ReadFile(fmt.Sprintf("%s/net/ipv4/conf/%s/rp_filter", o.ProcSys, dev))
		if err != nil {
			return -1
		}
		n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		return n
	}
	all, dev := read("all"), read(u.Interface)
	if max(all, dev) == 1 {
		r.problem(fmt.Sprintf("sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.%s.rp_filter=2 (loose), and the same in /etc/sysctl.d", u.Interface),
			"uplink %q: strict reverse-path filtering on %s (all=%d, %s=%d) drops the replies of flows translated to it", u.Name, u.Interface, all, u.Interface, dev)
		return
	}
	r.ok("uplink %q: rp_filter on %s is not strict (all=%d, %s=%d)", u.Name, u.Interface, all, u.Interface, dev)
}

// checkFromRules: connections that arrive on an uplink must be answered
// through it, or their replies leave by the default route with the uplink's
// address and are dropped upstream: a "from <address> lookup <table>"
// rule for each of its addresses.
func checkFromRules(r *Report, rules []netlink.Rule, u *policy.Uplink, addrs []netlink.Addr, ip string) {
	for _, a := range addrs {
		table := 0
		for _, ru := range rules {
			if ru.Src != nil && ru.Src.IP.Equal(a.IP) && ru.Table != 0 && ru.Table != unix.RT_TABLE_MAIN {
				table = ru.Table
				break
			}
		}
		if table == 0 {
			r.problem(fmt.Sprintf("%s rule add from %s lookup <the uplink's table> (or let rerouted manage the uplink)", ip, a.IP),
				"uplink %q: no %s rule answers connections to %s through %s; replies leave by the default route with a foreign source", u.Name, ip, a.IP, u.Interface)
			continue
		}
		r.ok("uplink %q: %s rule from %s lookup %d answers connections to it through %s", u.Name, ip, a.IP, table, u.Interface)
	}
}

// checkNAT looks for MASQUERADE and SNAT in nat postrouting chains that
// apply to an uplink's interface (or to every interface). Conntrack NAT
// rewrites the reply tuple of a translated flow, whose replies then no longer
// match it.
func checkNAT(r *Report, uplinks []*policy.Uplink) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	defer c.CloseLasting()
	chains, err := c.ListChains()
	if err != nil {
		return err
	}
	found := false
	for _, ch := range chains {
		if ch.Type != nftables.ChainTypeNAT || ch.Hooknum == nil || *ch.Hooknum != *nftables.ChainHookPostrouting {
			continue
		}
		rules, err := c.GetRules(ch.Table, ch)
		if err != nil {
			return fmt.Errorf("rules of %s %s: %w", ch.Table.Name, ch.Name, err)
		}
		for _, ru := range rules {
			kind, oif := natOf(ru.Exprs)
			if kind == "" {
				continue
			}
			for _, u := range uplinks {
				where, applies := natWhere(u, oif)
				if !applies {
					continue
				}
				found = true
				r.problem("remove it: rerouted gives the uplink's address to the flows routed there, without conntrack",
					"uplink %q: %s in table %s chain %s applies to %s; conntrack NAT rewrites the reply tuple of translated flows", u.Name, kind, familyName(ch.Table.Family)+" "+ch.Table.Name, ch.Name, where)
			}
		}
	}
	if !found {
		r.ok("no MASQUERADE or SNAT applies to an uplink")
	}
	return nil
}

// natOf reports whether a rule masquerades or source-NATs, and the output
// interface conditions it is limited to (none: every interface).
func natOf(es []expr.Any) (kind string, oif []ifMatch) {
	oifReg := uint32(0)
	for _, e := range es {
		switch e := e.(type) {
		case *expr.Meta:
			if e.Key == expr.MetaKeyOIFNAME {
				oifReg = e.Register
			}
		case *expr.Cmp:
			if oifReg != 0 && e.Register == oifReg && (e.Op == expr.CmpOpEq || e.Op == expr.CmpOpNeq) {
				// A name compared with its NUL (nft pads it to
				// IFNAMSIZ, iptables-nft adds one) is exact; without
				// one it is a prefix ("eth*", "eth+").
				m := ifMatch{name: string(bytes.TrimRight(e.Data, "\x00")), neg: e.Op == expr.CmpOpNeq}
				m.prefix = bytes.IndexByte(e.Data, 0) < 0
				oif = append(oif, m)
				oifReg = 0
			}
		case *expr.Masq:
			kind = "MASQUERADE"
		case *expr.NAT:
			if e.Type == expr.NATTypeSourceNAT {
				kind = "SNAT"
			}
		case *expr.Target: // iptables-nft
			if e.Name == "MASQUERADE" || e.Name == "SNAT" {
				kind = e.Name
			}
		}
	}
	return kind, oif
}

// ifMatch is a NAT rule's condition on the output interface: a name, or a
// prefix (iptables' "eth+", nft's "eth*"), maybe negated.
type ifMatch struct {
	name   string
	prefix bool
	neg    bool
}

func (m ifMatch) matches(iface string) bool {
	ok := iface == m.name || (m.prefix && strings.HasPrefix(iface, m.name))
	return ok != m.neg
}

func (m ifMatch) String() string {
	s := m.name
	if m.prefix {
		s += "+"
	}
	if m.neg {
		return "every interface but " + s
	}
	return s
}

// natWhere says whether a NAT rule limited to the output interfaces oif
// (all of them must match) applies to uplink u, and where, in words.
func natWhere(u *policy.Uplink, oif []ifMatch) (where string, applies bool) {
	if len(oif) == 0 {
		if u.Interface == "" {
			return "every interface", true
		}
		return "every interface, " + u.Interface + " included", true
	}
	if u.Interface == "" {
		// Nothing to compare with: say where it applies and let the
		// operator judge.
		s := make([]string, len(oif))
		for i, m := range oif {
			s[i] = m.String()
		}
		return strings.Join(s, " and ") + ", which may be the uplink's (it has no interface set)", true
	}
	for _, m := range oif {
		if !m.matches(u.Interface) {
			return "", false
		}
	}
	return u.Interface, true
}

func familyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyIPv4:
		return "ip"
	case nftables.TableFamilyIPv6:
		return "ip6"
	case nftables.TableFamilyINet:
		return "inet"
	}
	return strconv.Itoa(int(f))
}

// Print writes the report for a person.
func (r *Report) Print(w io.Writer) {
	for _, s := range r.OK {
		fmt.Fprintf(w, "ok       %s\n", s)
	}
	for _, s := range r.Notes {
		fmt.Fprintf(w, "NOTE     %s\n", s)
	}
	for _, f := range r.Findings {
		fmt.Fprintf(w, "PROBLEM  %s\n         fix: %s\n", f.Problem, f.Fix)
	}
}

// checkUplinkStates reports uplinks that are down now, as the daemon would
// see them: a link down, no address, or a marked route that leads
// elsewhere. (Health probes are the running daemon's: `rerouted uplinks`.)
// A family the uplink has no address of at all is not a problem: it
// simply does not carry that family.
func checkUplinkStates(r *Report, h *netlink.Handle, cfg *policy.Config) error {
	var states uplink.States
	if _, err := states.Update(h, cfg.Uplinks, time.Now()); err != nil {
		return fmt.Errorf("uplink states: %w", err)
	}
	for _, st := range states.List() {
		switch {
		case st.Up:
			r.ok("uplink %q is up for %s (route via %s)", st.Uplink, st.Family, st.Dev)
		case st.Family == "ipv6" && strings.HasPrefix(st.Why, "no IPv6 address"):
		default:
			r.problem("rules that name it take their next uplink (or on_down) until it is back; check the link, its address and its routing table",
				"uplink %q is down for %s: %s", st.Uplink, st.Family, st.Why)
		}
	}
	return nil
}
