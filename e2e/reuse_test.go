package e2e

import (
	"context"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"golang.org/x/sys/unix"
)

// udpFrom opens a UDP socket on the host bound to src and connected to
// dst, with SO_MARK mark if not 0.
func udpFrom(t *testing.T, w *networld.World, src, dst netip.AddrPort, mark int) *net.UDPConn {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		err := rc.Control(func(fd uintptr) {
			if mark != 0 {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark)
			}
		})
		if err != nil {
			return err
		}
		return serr
	}}
	var c *net.UDPConn
	err := w.Host.Do(func() error {
		pc, err := lc.ListenPacket(context.Background(), "udp", src.String())
		if err != nil {
			return err
		}
		c = pc.(*net.UDPConn)
		// connect(2) on the bound socket: the flow's tuple is fixed.
		rc, err := c.SyscallConn()
		if err != nil {
			return err
		}
		var cerr error
		if err := rc.Control(func(fd uintptr) {
			if dst.Addr().Is4() {
				cerr = unix.Connect(int(fd), &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()})
			} else {
				cerr = unix.Connect(int(fd), &unix.SockaddrInet6{Port: int(dst.Port()), Addr: dst.Addr().As16()})
			}
		}); err != nil {
			return err
		}
		return cerr
	})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// A UDP socket that takes the exact tuple of one that just closed is
// decided afresh: the kernel announces the old socket's end and its flow
// goes at once, not at the next sweeps (set 10 s apart here, so that they
// cannot be what ends it). The old socket was marked for ISP B by the
// application; the new one is not and must leave ISP A with its own
// address.
func TestUDPTupleReuse(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, "")
		cfg, err := os.ReadFile(e.cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(e.cfg, []byte(strings.Replace(string(cfg), `gc_interval = "200ms"`, `gc_interval = "10s"`, 1)), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := e.w.ServeUDP(53); err != nil {
			t.Fatal(err)
		}
		e.start()
		for _, fam := range []struct {
			name                 string
			server, hostA, hostB netip.Addr
		}{{"IPv4", networld.ServerAddr, networld.HostA, networld.HostB}, {"IPv6", networld.Server6, networld.HostA6, networld.HostB6}} {
			server := netip.AddrPortFrom(fam.server, 53)
			old := 0
			const rounds = 20
			for i := 0; i < rounds; i++ {
				src := netip.AddrPortFrom(fam.hostA, uint16(42000+i))
				c := udpFrom(t, e.w, src, server, networld.MarkB)
				if peer, err := networld.AskUDP(c, server, "marked", 2*time.Second); err != nil || peer.Addr() != fam.hostB {
					t.Fatalf("%s round %d: the marked socket's datagram: server saw %v, err %v", fam.name, i, peer, err)
				}
				c.Close()
				// Give the kernel's announcement a moment: it comes after
				// an RCU grace period, from a work queue.
				time.Sleep(20 * time.Millisecond)
				c = udpFrom(t, e.w, src, server, 0)
				peer, err := networld.AskUDP(c, server, "unmarked", 2*time.Second)
				c.Close()
				switch {
				case err != nil:
					t.Errorf("%s round %d: the new socket's datagram: %v", fam.name, i, err)
				case peer.Addr() == fam.hostB:
					old++
				case peer != src:
					t.Errorf("%s round %d: the new socket's datagram: server saw %v, want %v", fam.name, i, peer, src)
				}
			}
			if old != 0 {
				t.Errorf("%s: %d of %d new sockets inherited the closed socket's translation", fam.name, old, rounds)
			}
		}
		// The old flows ended as their sockets did: the kernel announced
		// the end, or (the kernel having decided the flow) the socket was
		// gone by the time the daemon learned of the flow.
		if _, err := e.d.WaitFor(`msg="socket closed" proto=udp`, time.Second); err != nil {
			if _, err2 := e.d.WaitFor(`msg="socket closed before the kernel's decision was learned" proto=udp`, 0); err2 != nil || dp != "kernel" {
				t.Error(err)
			}
		}
	})
}
