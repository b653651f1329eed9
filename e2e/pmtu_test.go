package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
)

// offloadsOff makes interfaces send packets as the MTU allows, not as GSO
// super-packets: the MTU is really enforced.
func offloadsOff(t *testing.T, ns *networld.NS, devs ...string) {
	t.Helper()
	for _, dev := range devs {
		if _, err := ns.Run("ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off"); err != nil {
			t.Fatal(err)
		}
	}
}

// narrow gives the path through ISP B a 1280-byte link: inside ISP B (its
// interface towards the internet; the server's own side stays at 1500, so
// the server's MSS does not hide the bottleneck), or ISP B's own interface
// on the host (hb), where the host itself sends the ICMP error.
func narrow(t *testing.T, w *networld.World, where string) {
	t.Helper()
	var err error
	switch where {
	case "inside ISP B":
		err = w.B.IP("link set dev wan mtu 1280")
	case "on hb":
		err = w.Host.IP("link set dev hb mtu 1280")
		if err == nil {
			err = w.B.IP("link set dev cust mtu 1280")
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	offloadsOff(t, w.Host, "ha", "hb")
	offloadsOff(t, w.B.NS, "cust", "wan")
	offloadsOff(t, w.Net, "a", "b")
}

// upload sends size bytes to the server on port and reports whether it got
// through within timeout.
func upload(t *testing.T, w *networld.World, dst networld.DialOptions, size int64, timeout time.Duration) error {
	t.Helper()
	c, err := w.Dial(dst)
	if err != nil {
		return err
	}
	defer c.Close()
	done := make(chan error, 1)
	go func() {
		_, n, err := networld.Exchange(c, size)
		if err == nil && n != size {
			err = fmt.Errorf("server received %d of %d bytes", n, size)
		}
		done <- err
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(timeout):
		c.SetLinger(0)
		c.Close()
		return fmt.Errorf("no progress: %d bytes not through in %s", size, timeout)
	}
}

// Path MTU discovery through translated flows: the ICMP errors (from a
// router inside ISP B, or from the host itself when hb is the narrow link)
// are addressed to the wire's source and quote the wire's tuple; rerouted
// readdresses them, and a 20 MB upload completes.
func TestPathMTUDiscovery(t *testing.T) {
	worldtest.Require(t) // its subtests need root: without it the test must skip, not pass
	for _, where := range []string{"inside ISP B", "on hb"} {
		t.Run(strings.ReplaceAll(where, " ", "_"), func(t *testing.T) {
			datapaths(t, func(t *testing.T, dp string) {
				e := newEnv(t, dp, webRule)
				narrow(t, e.w, where)
				e.start()
				for _, dst := range []networld.DialOptions{
					{Port: 80},
					{Dst: networld.Server6, Port: 80},
				} {
					if err := upload(t, e.w, dst, 20<<20, 20*time.Second); err != nil {
						t.Fatalf("to %v: %v", dst.Dst, err)
					}
				}
				lines := strings.Count(e.d.Output(), "icmp error readdressed")
				if lines < 2 {
					t.Fatalf("%d ICMP errors readdressed, want at least one per family", lines)
				}
			})
		})
	}
}

// Without the ICMP translation the same upload stalls: the errors reach no
// socket. (The control runs first: a path MTU once learnt would hide it.)
func TestPathMTUBlackholeWithoutICMPTranslation(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	narrow(t, e.w, "inside ISP B")
	e.start()
	// The errors never reach the daemon: a table of the test's own drops
	// them before rerouted's chain sees them. (Deleting rerouted's own
	// rules would not do: it puts them back at once.)
	if err := e.w.Host.Nft(`table inet pmtucontrol {
	chain pre {
		type filter hook prerouting priority -400; policy accept;
		icmp type destination-unreachable drop
		icmpv6 type packet-too-big drop
	}
}
`); err != nil {
		t.Fatal(err)
	}
	if err := upload(t, e.w, networld.DialOptions{Port: 80}, 20<<20, 3*time.Second); err == nil {
		t.Fatal("the upload got through with no ICMP translation: this setup does not need PMTU discovery")
	}
	// With the errors reaching the daemon again: now it works.
	if _, err := e.w.Host.Run("nft", "delete", "table", "inet", "pmtucontrol"); err != nil {
		t.Fatal(err)
	}
	if err := upload(t, e.w, networld.DialOptions{Port: 80}, 20<<20, 20*time.Second); err != nil {
		t.Fatal(err)
	}
}
