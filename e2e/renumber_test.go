package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
)

var hostB3 = netip.MustParseAddr("203.0.113.3")

// ISP B renumbers the host, as a DHCP or PPPoE client does: 203.0.113.2
// goes, 203.0.113.3 comes, while a TCP upload and a UDP request/response
// flow are translated to .2. New flows take .3 at once; the UDP flow's
// answers resume from .3; the TCP application learns at once (reset_tcp,
// the default) or its translation goes (reset_tcp = false); and ISP B's
// wire carries no packet from .2 once it is gone.
func TestRenumbering(t *testing.T) {
	worldtest.Require(t) // its subtests need root: without it the test must skip, not pass
	for _, resetTCP := range []bool{true, false} {
		t.Run(fmt.Sprintf("reset_tcp=%v", resetTCP), func(t *testing.T) {
			e := newEnv(t, "kernel", "")
			uplinkKeys := ""
			if !resetTCP {
				uplinkKeys = "reset_tcp = false\n"
			}
			e.withMetrics(strings.Replace(repairRules, "[[rule]]", uplinkKeys+"\n[[rule]]", 1))
			if _, err := e.w.ServeUDP(53); err != nil {
				t.Fatal(err)
			}
			if err := e.w.Host.Sysctl("net.ipv4.conf.hb.promote_secondaries=1"); err != nil {
				t.Fatal(err)
			}
			e.start()

			up, err := e.w.Dial(networld.DialOptions{Port: 80})
			if err != nil {
				t.Fatal(err)
			}
			defer up.Close()
			r := bufio.NewReader(up)
			if peer, err := networld.Greeting(r); err != nil || peer.Addr() != networld.HostB {
				t.Fatalf("upload: server saw %v, err %v", peer, err)
			}
			uploadDone := make(chan error, 1)
			go func() {
				buf := make([]byte, 16<<10)
				for {
					if _, err := up.Write(buf); err != nil {
						uploadDone <- err
						return
					}
					time.Sleep(5 * time.Millisecond)
				}
			}()
			dns := netip.AddrPortFrom(networld.ServerAddr, 53)
			u, err := e.w.UDPSocket(dns, true, netip.AddrPort{})
			if err != nil {
				t.Fatal(err)
			}
			defer u.Close()
			if p, err := networld.AskUDP(u, dns, "before", 2*time.Second); err != nil || p.Addr() != networld.HostB {
				t.Fatalf("udp before: server saw %v, err %v", p, err)
			}
			udpStop := make(chan struct{})
			udpFrom3 := make(chan time.Time, 1)
			go func() {
				for i := 0; ; i++ {
					select {
					case <-udpStop:
						return
					default:
					}
					if p, err := networld.AskUDP(u, dns, fmt.Sprint("q", i), 200*time.Millisecond); err == nil && p.Addr() == hostB3 {
						select {
						case udpFrom3 <- time.Now():
						default:
						}
					}
					time.Sleep(20 * time.Millisecond)
				}
			}()
			defer close(udpStop)
			time.Sleep(300 * time.Millisecond)

			// Renumber: the new address first, then the old one goes (the
			// new one is promoted to primary). What leaves with .2 once it
			// is no longer the host's is counted on the host's way out to
			// ISP B (fib: .2 not local), from a baseline read before: a
			// baseline read after the deletion would hide what left
			// meanwhile, and one on ISP B's wire could not tell those
			// packets from the ones sent while .2 was still the host's.
			if err := e.w.Host.Nft(`table inet stale2 {
	counter left {}
	chain postrouting {
		type filter hook postrouting priority 500; policy accept;
		oifname "hb" ip saddr 203.0.113.2 fib saddr type != local counter name "left"
	}
}
`); err != nil {
				t.Fatal(err)
			}
			staleLeft := func() uint64 {
				t.Helper()
				out, err := e.w.Host.Run("nft", "list", "counter", "inet", "stale2", "left")
				if err != nil {
					t.Fatal(err)
				}
				var n uint64
				fmt.Sscanf(out[strings.Index(out, "packets ")+len("packets "):], "%d", &n)
				return n
			}
			left := staleLeft()
			if _, err := e.w.Host.Run("ip", "addr", "add", "203.0.113.3/24", "dev", "hb"); err != nil {
				t.Fatal(err)
			}
			if _, err := e.w.Host.Run("ip", "addr", "del", "203.0.113.2/24", "dev", "hb"); err != nil {
				t.Fatal(err)
			}
			gone := time.Now()

			// New flows take .3 at once.
			if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != hostB3 {
				t.Errorf("a new connection: server saw %v, err %v", peer, err)
			}
			// The UDP flow's answers resume from .3.
			select {
			case at := <-udpFrom3:
				t.Logf("udp answered from .3 %v after .2 went", at.Sub(gone).Round(time.Millisecond))
				if at.Sub(gone) > time.Second {
					t.Errorf("the UDP flow took %v to resume from .3", at.Sub(gone))
				}
			case <-time.After(2 * time.Second):
				t.Error("the UDP flow never resumed from .3")
			}
			// The TCP application learns at once, or its translation goes.
			if resetTCP {
				select {
				case err := <-uploadDone:
					t.Logf("upload ended %v after .2 went: %v", time.Since(gone).Round(time.Millisecond), err)
					if !errors.Is(err, net.ErrClosed) && !strings.Contains(err.Error(), "connection") {
						t.Errorf("upload ended with %v", err)
					}
				case <-time.After(2 * time.Second):
					t.Error("the upload's application was not told its connection is gone")
				}
				if _, err := e.d.WaitFor(`how=reset`, time.Second); err != nil {
					t.Error(err)
				}
			} else {
				eventually(t, 2*time.Second, "the upload's translation removed", func() bool { return e.elements("tcp_out4") <= 1 })
				if _, err := e.d.WaitFor(`how=removed`, time.Second); err != nil {
					t.Error(err)
				}
			}
			if _, err := e.d.WaitFor(`[MOVE] udp`, time.Second); err != nil {
				t.Error(err)
			}
			time.Sleep(300 * time.Millisecond)
			if n := staleLeft() - left; n != 0 {
				t.Errorf("%d packets left for ISP B from 203.0.113.2 after it went", n)
			}
			if n := e.metric(`rerouted_flows_moved_total{how="redecided",uplink="isp-b"}`); n < 1 {
				t.Errorf("rerouted_flows_moved_total redecided = %v", n)
			}
			t.Logf("stale-source packets dropped in the kernel: %v", e.metric("rerouted_stale_source_drops_total"))
		})
	}
}
