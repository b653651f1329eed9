package e2e

import (
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
)

// Datagrams larger than the path's MTU travel as IP fragments, both ways:
// the host's own 5,000- and 20,000-byte datagrams are fragmented after the
// translation, and the server's answers of the same size arrive in
// fragments, of which only the first carries the ports. A translated flow
// carries them byte for byte, IPv4 and IPv6, decided by a host mark and by
// a rule, with no connection tracking on the host.
func TestFragmentedDatagrams(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, `
[[rule]]
name = "big-rule"
uplink = "isp-b"
protocol = "udp"
dport = [5353]
`)
		for _, port := range []uint16{53, 5353} {
			if _, err := e.w.ServeUDP(port); err != nil {
				t.Fatal(err)
			}
		}
		e.hostMarkDatagrams(53)
		e.start()
		dropped := e.counter(e.w.B, "foreign")
		rng := rand.New(rand.NewPCG(1, 2))
		for _, c := range []struct {
			name string
			dst  netip.AddrPort
			want netip.Addr
		}{
			{"host mark", netip.AddrPortFrom(networld.ServerAddr, 53), networld.HostB},
			{"host mark IPv6", netip.AddrPortFrom(networld.Server6, 53), networld.HostB6},
			{"rule", netip.AddrPortFrom(networld.ServerAddr, 5353), networld.HostB},
			{"rule IPv6", netip.AddrPortFrom(networld.Server6, 5353), networld.HostB6},
		} {
			for _, connect := range []bool{true, false} {
				s, err := e.w.UDPSocket(c.dst, connect, netip.AddrPort{})
				if err != nil {
					t.Fatal(err)
				}
				// A small datagram first, then the big ones on the same
				// tuple; then a fresh socket whose first datagram is big.
				sizes := []int{10, 5000, 20000, 5000}
				if !connect {
					sizes = []int{20000, 20000, 5000}
				}
				for i, n := range sizes {
					b := make([]byte, n)
					for j := range b {
						b[j] = byte(rng.Uint32())
					}
					msg := strings.ReplaceAll(string(b), " ", "_") // AskUDP splits the answer at the first space
					peer, err := networld.AskUDP(s, c.dst, msg, 3*time.Second)
					if err != nil || peer.Addr() != c.want {
						t.Errorf("%s (connected %v), datagram %d of %d bytes: server saw %v, err %v; want %v",
							c.name, connect, i, n, peer, err, c.want)
					}
				}
				s.Close()
			}
		}
		if n := e.counter(e.w.B, "foreign"); n != dropped {
			t.Errorf("ISP B dropped %d packets with a foreign source", n-dropped)
		}
		// No connection tracking did the reassembly: the host has no ct
		// rule and no conntrack entry.
		ruleset, err := e.w.Host.Run("nft", "list", "ruleset")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(ruleset, " ct ") || strings.Contains(ruleset, "masquerade") {
			t.Errorf("the host's ruleset uses conntrack:\n%s", ruleset)
		}
		out, err := e.w.Host.Run("conntrack", "-C")
		if err != nil {
			t.Fatalf("conntrack -C: %v", err)
		}
		if strings.TrimSpace(out) != "0" {
			t.Errorf("conntrack -C on the host: %s, want 0", out)
		}
	})
}
