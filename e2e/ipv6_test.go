package e2e

import (
	"fmt"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
)

// IPv6 TCP through ISP B: the ISPs filter IPv6 sources too. Without
// rerouted a marked IPv6 connection leaves ISP B with ISP A's address and is
// dropped; with it the server sees ISP B's IPv6 address, 10 MB cross byte
// for byte, and the flow goes with its socket.
func TestIPv6TCP(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, webRule)
		e.hostMark("nft", 443)
		to := func(port uint16, timeout time.Duration) networld.DialOptions {
			return networld.DialOptions{Dst: networld.Server6, Port: port, Timeout: timeout}
		}
		if _, err := e.w.Serve(443); err != nil {
			t.Fatal(err)
		}
		dropped := e.counter(e.w.B, "foreign")
		if peer, err := e.w.FetchFrom(to(443, 1500*time.Millisecond)); err == nil {
			t.Fatalf("marked IPv6 connection succeeded without rerouted (server saw %v)", peer)
		}
		if e.counter(e.w.B, "foreign") == dropped {
			t.Fatal("ISP B's drop counter did not rise for the untranslated IPv6 SYN")
		}

		e.start()
		dropped = e.counter(e.w.B, "foreign")
		// A host mark (port 443) and a TOML rule (port 80), both IPv6.
		for _, port := range []uint16{443, 80} {
			c, err := e.w.Dial(to(port, 3*time.Second))
			if err != nil {
				t.Fatalf("port %d: %v", port, err)
			}
			peer, n, err := networld.Exchange(c, 10<<20)
			c.Close()
			if err != nil || n != 10<<20 || peer.Addr() != networld.HostB6 {
				t.Fatalf("port %d: server saw %v, %d bytes, err %v; want %v", port, peer, n, err, networld.HostB6)
			}
			if _, err := e.d.WaitFor(fmt.Sprintf("dst=2001:db8:80::80 sport=%d dport=%d mark=100 => src=2001:db8:b::2 sport=%d", peer.Port(), port, peer.Port()), time.Second); err != nil {
				t.Error(err)
			}
		}
		if n := e.counter(e.w.B, "foreign"); n != dropped {
			t.Errorf("ISP B dropped %d packets with a foreign source", n-dropped)
		}
		// An unmatched IPv6 port stays on ISP A, untranslated.
		if peer, err := e.w.FetchFrom(to(8080, 3*time.Second)); err != nil || peer.Addr() != networld.HostA6 {
			t.Fatalf("port 8080: server saw %v, err %v; want %v", peer, err, networld.HostA6)
		}
		// TIME_WAIT ended by hand: the IPv6 flows go too (sweeps dump both
		// families). Where the kernel cannot end it, TestFlowsLiveExactlyAsLongAsSockets
		// waits for TIME_WAIT; this test does not.
		if !e.endTimeWait("[2001:db8:80::80]") {
			return
		}
		eventually(t, 5*time.Second, "the IPv6 flows to be removed", func() bool { return len(e.flows()) == 0 })
	})
}
