package e2e

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/nftdp/nftfeat"
)

// nftListRules is a policy that puts every kind of rule, chain and set
// rerouted makes into its table: a rule per protocol with a port list, a
// destination list, a uid list, a negated port; host marks honoured; a
// per-user budget.
const nftListRules = `
[[rule]]
name = "web"
uplink = "isp-b"
protocol = "tcp"
dport = [80, 8080]
dst = ["192.0.2.0/24", "2001:db8:80::/64"]

[[rule]]
name = "dns"
uplink = "isp-b"
protocol = "udp"
dport = [53]

[[rule]]
name = "ping"
uplink = "isp-b"
protocol = "icmp"

[[rule]]
name = "root but not ssh"
uplink = "isp-b"
uid = [0, 4321]
not_dport = [22, 2222]

[[rule]]
name = "a group"
uplink = "isp-b"
gid = [4322, 4323]
`

// runNft runs nft in the host namespace and returns its standard output
// and error apart.
func runNft(t *testing.T, ns *networld.NS, nft string, args ...string) (string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := ns.Command(nft, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("nft %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), stderr.String()
}

// An operator's first look at the firewall while rerouted runs, with
// translated TCP, UDP and echo flows of both families installed: `nft list
// ruleset` and `nft list tables` print no errors, and the ruleset reads as
// the table it is.
func TestNftListClean(t *testing.T) {
	e := newEnv(t, "kernel", nftListRules)
	cfg, err := os.ReadFile(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := writeFile(e.cfg, strings.Replace(string(cfg), "[daemon]\n", "[daemon]\nhonor_marks = true\nnew_flows_per_uid = 1000\n", 1)); err != nil {
		t.Fatal(err)
	}
	if _, err := e.w.ServeUDP(53); err != nil {
		t.Fatal(err)
	}
	e.hostMark("nft", 443)
	if _, err := e.w.Serve(443); err != nil {
		t.Fatal(err)
	}
	// Which enqueue form this kernel has is the kernel's word (the probe,
	// in the test's namespace), not the daemon's: a daemon that fell to
	// the xtables target where nft_queue works is a regression, and must
	// not turn on the xtables tolerances below.
	var queue string
	if err := e.w.Host.Do(func() (err error) { _, queue, err = nftfeat.Probe(); return err }); err != nil {
		t.Fatal(err)
	}
	if queue == "" {
		t.Fatal("the kernel has neither enqueue form")
	}
	xt := queue == nftfeat.QueueXT
	e.start()
	ready, err := e.d.WaitFor("msg=ready", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("queue_method=%q", queue); !strings.Contains(ready, want) {
		t.Errorf("the kernel's probe finds %q, but the daemon is ready with another enqueue form: %s", queue, ready)
	}
	// Flows held open while nft lists the table: TCP (a rule's and a host
	// mark's), UDP and echo, both families.
	var want []string
	for _, dst := range []netip.Addr{networld.ServerAddr, networld.Server6} {
		src, newSrc := networld.HostA, networld.HostB
		if dst.Is6() {
			src, newSrc = networld.HostA6, networld.HostB6
		}
		for _, port := range []uint16{80, 443} {
			c, err := e.w.Dial(networld.DialOptions{Dst: dst, Port: port})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			sport := netip.MustParseAddrPort(c.LocalAddr().String()).Port()
			key := fmt.Sprintf("%s . %d . %s . %d", src, sport, dst, port)
			reply := fmt.Sprintf("%s . %d . %s . %d", newSrc, sport, dst, port)
			want = append(want, key+" : "+newSrc.String(), fmt.Sprintf("%s : %d", key, sport), key+" : 0x00000064",
				reply+" : "+src.String(), fmt.Sprintf("%s : %d", reply, sport))
		}
		dns := netip.AddrPortFrom(dst, 53)
		u, err := e.w.UDPSocket(dns, true, netip.AddrPort{})
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		if p, err := networld.AskUDP(u, dns, "q", 2*time.Second); err != nil || p.Addr() != newSrc {
			t.Fatalf("udp to %v: server saw %v, err %v", dns, p, err)
		}
		if _, err := e.w.Ping(dst, networld.PingSocket, 0, 2*time.Second); err != nil {
			t.Fatal(err)
		}
	}
	// What reads as the table it is: its chains, the per-flow maps with
	// their elements, every field a translation writes, host-order marks
	// and uids.
	want = append(want, "table inet rerouted {", "chain output {", "chain prerouting {", "chain filter_syn {", "chain filter_new {",
		"chain enqueue_syn {", "chain enqueue_new {", "map tcp_out4 {", "map tcp_mark6 {", "map udp_dport4 {", "map icmp_in6 {",
		"ip saddr set ip saddr . tcp sport . ip daddr . tcp dport map @tcp_out4",
		"tcp sport set ip saddr . tcp sport . ip daddr . tcp dport map @tcp_sport4",
		"meta mark set ip6 saddr . udp sport . ip6 daddr . udp dport map @udp_mark6",
		"ip6 daddr set ip6 daddr . tcp dport . ip6 saddr . tcp sport map @tcp_in6",
		"tcp dport set ip6 daddr . tcp dport . ip6 saddr . tcp sport map @tcp_dport6",
		"icmp type echo-request ip saddr set ip saddr . icmp id . ip daddr . icmp id map @icmp_out4",
		"elements = { 0, 4321 }", "elements = { 4322, 4323 }", "th dport != @f", "meta skuid @f", "queue num 0",
		// A key of one value is compared in the rule, without a set.
		"meta nfproto ipv4 udp dport 53 goto enqueue_new")
	// nft's one warning about a table holding an xtables expression is
	// true where the kernel has no native queue statement (this table
	// then queues through nft_compat's NFQUEUE target).
	// KNOWN GAP: libxtables cannot print an xtables target in an inet
	// table and says so once for each; moving the targets out of the inet
	// table is still to do.
	allowed := func(line string) bool {
		return xt && (line == "# Warning: table inet rerouted is managed by iptables-nft, do not touch!" ||
			line == "libxtables: unhandled NFPROTO in xtables_set_nfproto")
	}
	for _, nft := range append([]string{"nft"}, strings.Fields(os.Getenv("REROUTED_E2E_NFT"))...) {
		for _, args := range [][]string{{"list", "ruleset"}, {"list", "tables"}} {
			out, stderr := runNft(t, e.w.Host, nft, args...)
			for _, line := range strings.Split(strings.TrimSpace(stderr), "\n") {
				if line != "" && !allowed(line) {
					t.Errorf("%s %s printed on standard error: %q (xt NFQUEUE: %v)\nall of it:\n%s", nft, strings.Join(args, " "), line, xt, stderr)
				}
			}
			// What nft could not decode it prints in the listing itself.
			for _, line := range strings.Split(out, "\n") {
				if line = strings.TrimSpace(line); undecoded(line) && !allowed(line) {
					t.Errorf("%s %s printed what it could not decode: %q (xt NFQUEUE: %v)\nall of it:\n%s", nft, strings.Join(args, " "), line, xt, out)
				}
			}
			if args[1] == "tables" {
				if !strings.Contains(out, "table inet rerouted") {
					t.Errorf("%s list tables does not show the table:\n%s", nft, out)
				}
				continue
			}
			for _, w := range want {
				if !strings.Contains(out, w) {
					t.Errorf("%s list ruleset lacks %q:\n%s", nft, w, out)
				}
			}
		}
	}
}

// undecodedRE matches what nft prints, in a listing, for what it could not
// decode: an expression or a type it does not know, an xtables
// expression it could not translate (printed raw, or as a comment), its
// warnings.
var undecodedRE = regexp.MustCompile(`(?i)\[invalid type\]|\[unknown|unknown (expression|type|data)|\bunhandled\b|^# |#\s*xt_|\bxt (target|match)\b|warning|error|libxtables|__set%d|\?\?`)

func undecoded(line string) bool { return undecodedRE.MatchString(line) }
