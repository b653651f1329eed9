package networld

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"sync"
)

// Addresses of the world, all from the documentation ranges.
var (
	HostA      = netip.MustParseAddr("198.51.100.2") // host's address at ISP A (default route)
	GwA        = netip.MustParseAddr("198.51.100.1")
	HostB      = netip.MustParseAddr("203.0.113.2") // host's address at ISP B
	GwB        = netip.MustParseAddr("203.0.113.1")
	ServerAddr = netip.MustParseAddr("192.0.2.80") // the internet's servers

	HostA6   = netip.MustParseAddr("2001:db8:a::2") // the same, IPv6
	HostB6   = netip.MustParseAddr("2001:db8:b::2")
	Server6  = netip.MustParseAddr("2001:db8:80::80")
	prefixA6 = netip.MustParsePrefix("2001:db8:a::/64")
	prefixB6 = netip.MustParsePrefix("2001:db8:b::/64")
)

// Names and numbers on the host.
const (
	DevA  = "ha" // host's interface to ISP A
	DevB  = "hb" // host's interface to ISP B
	MarkB = 100  // fwmark that routes out ISP B
	TabB  = 100  // routing table of ISP B
)

// World is host + two ISPs + internet.
type World struct {
	Prefix string
	Host   *NS
	A, B   *ISP
	Net    *NS
	// DaemonPrefix, if set, runs the daemon through this command line in
	// the host namespace (e.g. nsenter into a mount namespace of a test's
	// own).
	DaemonPrefix []string
	// StateDir is the daemons' state directory (STATE_DIRECTORY), the
	// world's own, removed with it.
	StateDir string

	logf    func(string, ...any)
	mu      sync.Mutex
	servers map[uint16]*Server
	closers []func() // other servers' Close
}

// ISP is one provider: its namespace and its customer-facing counters.
type ISP struct {
	*NS
	Customer  netip.Prefix
	Customer6 netip.Prefix
}

// New builds the world. logf receives the steps (nil for none).
func New(prefix string, logf func(string, ...any)) (w *World, err error) {
	if logf == nil {
		logf = func(string, ...any) {}
	}
	w = &World{Prefix: prefix, logf: logf, servers: map[uint16]*Server{}}
	defer func() {
		if err != nil {
			err = errors.Join(err, w.Close())
			w = nil
		}
	}()
	if w.StateDir, err = os.MkdirTemp("", prefix+"-state-"); err != nil {
		return w, err
	}
	for _, p := range []struct {
		ns   **NS
		role string
	}{{&w.Host, "host"}, {&w.Net, "net"}} {
		if *p.ns, err = NewNS(prefix + "-" + p.role); err != nil {
			return w, err
		}
	}
	// Ping sockets (unprivileged ICMP echo) for every group on the host.
	if err = w.Host.Sysctl("net.ipv4.ping_group_range=0 2147483647"); err != nil {
		return w, err
	}
	w.A = &ISP{Customer: netip.MustParsePrefix("198.51.100.0/24"), Customer6: prefixA6}
	w.B = &ISP{Customer: netip.MustParsePrefix("203.0.113.0/24"), Customer6: prefixB6}
	if w.A.NS, err = NewNS(prefix + "-ispa"); err != nil {
		return w, err
	}
	if w.B.NS, err = NewNS(prefix + "-ispb"); err != nil {
		return w, err
	}

	// Links are created straight inside the namespaces: nothing appears in
	// the caller's namespace, even for a moment.
	steps := []struct {
		ns            *NS
		lines, lines6 []string
	}{
		{w.Host, []string{
			"link add " + DevA + " type veth peer name cust netns " + w.A.Name,
			"link add " + DevB + " type veth peer name cust netns " + w.B.Name,
			"addr add 198.51.100.2/24 dev " + DevA, "link set " + DevA + " up",
			"addr add 203.0.113.2/24 dev " + DevB, "link set " + DevB + " up",
			"route add default via 198.51.100.1 dev " + DevA,
			fmt.Sprintf("route add default via 203.0.113.1 dev %s table %d", DevB, TabB),
			fmt.Sprintf("rule add fwmark %d table %d", MarkB, TabB),
			fmt.Sprintf("rule add from 203.0.113.2 table %d", TabB),
		}, []string{ // IPv6: the same two uplinks and rules. nodad: usable at once.
			"addr add 2001:db8:a::2/64 dev " + DevA + " nodad",
			"addr add 2001:db8:b::2/64 dev " + DevB + " nodad",
			"route add default via 2001:db8:a::1 dev " + DevA,
			fmt.Sprintf("route add default via 2001:db8:b::1 dev %s table %d", DevB, TabB),
			fmt.Sprintf("rule add fwmark %d table %d", MarkB, TabB),
			fmt.Sprintf("rule add from 2001:db8:b::2 table %d", TabB),
		}},
		{w.A.NS, []string{
			"link add wan type veth peer name a netns " + w.Net.Name,
			"addr add 198.51.100.1/24 dev cust", "link set dev cust up",
			"addr add 192.0.2.1/30 dev wan", "link set dev wan up",
			"route add default via 192.0.2.2",
		}, []string{
			"addr add 2001:db8:a::1/64 dev cust nodad", "addr add 2001:db8:ffa::1/64 dev wan nodad",
			"route add default via 2001:db8:ffa::2",
		}},
		{w.B.NS, []string{
			"link add wan type veth peer name b netns " + w.Net.Name,
			"addr add 203.0.113.1/24 dev cust", "link set dev cust up",
			"addr add 192.0.2.5/30 dev wan", "link set dev wan up",
			"route add default via 192.0.2.6",
		}, []string{
			"addr add 2001:db8:b::1/64 dev cust nodad", "addr add 2001:db8:ffb::1/64 dev wan nodad",
			"route add default via 2001:db8:ffb::2",
		}},
		{w.Net, []string{
			"addr add 192.0.2.2/30 dev a", "link set dev a up",
			"addr add 192.0.2.6/30 dev b", "link set dev b up",
			"addr add 192.0.2.80/32 dev lo",
			"route add 198.51.100.0/24 via 192.0.2.1",
			"route add 203.0.113.0/24 via 192.0.2.5",
		}, []string{
			"addr add 2001:db8:ffa::2/64 dev a nodad", "addr add 2001:db8:ffb::2/64 dev b nodad",
			"addr add 2001:db8:80::80/128 dev lo nodad",
			"route add 2001:db8:a::/64 via 2001:db8:ffa::1",
			"route add 2001:db8:b::/64 via 2001:db8:ffb::1",
		}},
	}
	for _, s := range steps {
		if err = s.ns.IP(s.lines...); err != nil {
			return w, err
		}
		if err = s.ns.IP6(s.lines6...); err != nil {
			return w, err
		}
	}
	for _, isp := range []*ISP{w.A, w.B} {
		if err = isp.Sysctl("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"); err != nil {
			return w, err
		}
		if err = isp.Nft(bcp38(isp.Customer, isp.Customer6)); err != nil {
			return w, err
		}
	}
	logf("world %s: host %s (%s via ISP A, %s via ISP B, fwmark %d -> table %d), server %s",
		prefix, w.Host.Name, HostA, HostB, MarkB, TabB, ServerAddr)
	return w, nil
}

// bcp38 is an ISP's ingress filter: customer packets whose source is not the
// customer's are counted and dropped; the rest are counted by kind.
func bcp38(customer, customer6 netip.Prefix) string {
	return fmt.Sprintf(`table inet isp {
	counter foreign {}
	counter forwarded {}
	counter syn {}
	counter fin {}
	counter rst {}
	chain forward {
		type filter hook forward priority 0; policy accept;
		iifname "cust" ip saddr != %s counter name "foreign" drop
		iifname "cust" ip6 saddr != %s counter name "foreign" drop
		iifname "cust" counter name "forwarded"
		iifname "cust" tcp flags & (syn | ack) == syn counter name "syn"
		iifname "cust" tcp flags & fin == fin counter name "fin"
		iifname "cust" tcp flags & rst == rst counter name "rst"
	}
}
`, customer, customer6)
}

var packetsRE = regexp.MustCompile(`packets (\d+)`)

// Counter reads one of the ISP's packet counters: foreign (dropped for a
// wrong source), forwarded, syn, fin, rst.
func (isp *ISP) Counter(name string) (uint64, error) {
	out, err := isp.Run("nft", "list", "counter", "inet", "isp", name)
	if err != nil {
		return 0, err
	}
	m := packetsRE.FindStringSubmatch(out)
	if m == nil {
		return 0, fmt.Errorf("no packet count in %q", out)
	}
	return strconv.ParseUint(m[1], 10, 64)
}

// Close stops the servers and removes every namespace.
func (w *World) Close() error {
	var errs []error
	w.mu.Lock()
	for _, s := range w.servers {
		s.Close()
	}
	w.servers = nil
	closers := w.closers
	w.closers = nil
	w.mu.Unlock()
	for _, c := range closers {
		c()
	}
	for _, ns := range []*NS{w.Host, w.Net, nsOf(w.A), nsOf(w.B)} {
		if ns != nil {
			errs = append(errs, ns.Delete())
		}
	}
	if w.StateDir != "" {
		errs = append(errs, os.RemoveAll(w.StateDir))
	}
	return errors.Join(errs...)
}

func nsOf(isp *ISP) *NS {
	if isp == nil {
		return nil
	}
	return isp.NS
}
