package e2e

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"golang.org/x/sys/unix"
)

// rawSYN sends one SYN from src (port sport) to dst on a raw socket in the
// host's namespace, as traceroute -T, SYN scanners and hping3 do, and
// reports whether a SYN-ACK for it came back within a second. No TCP socket
// owns the connection: the host answers the SYN-ACK with a reset.
func rawSYN(t *testing.T, w *networld.World, src netip.Addr, sport uint16, dst netip.AddrPort) bool {
	t.Helper()
	var answered bool
	err := w.Host.Do(func() error {
		v6 := dst.Addr().Is6()
		family, sa := unix.AF_INET6, unix.Sockaddr(&unix.SockaddrInet6{Addr: src.As16()})
		if !v6 {
			family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: src.As4()}
		}
		fd, err := unix.Socket(family, unix.SOCK_RAW, unix.IPPROTO_TCP)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		if err := unix.Bind(fd, sa); err != nil {
			return fmt.Errorf("bind %v: %w", src, err)
		}
		if v6 { // the kernel fills in the checksum
			if err := unix.SetsockoptInt(fd, unix.IPPROTO_IPV6, unix.IPV6_CHECKSUM, 16); err != nil {
				return err
			}
		}
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000}); err != nil {
			return err
		}
		seg := make([]byte, 20)
		binary.BigEndian.PutUint16(seg[0:], sport)
		binary.BigEndian.PutUint16(seg[2:], dst.Port())
		binary.BigEndian.PutUint32(seg[4:], 0x12345678)
		seg[12] = 5 << 4
		seg[13] = 0x02 // SYN
		binary.BigEndian.PutUint16(seg[14:], 64240)
		var to unix.Sockaddr
		if v6 {
			to = &unix.SockaddrInet6{Addr: dst.Addr().As16()}
		} else {
			to = &unix.SockaddrInet4{Addr: dst.Addr().As4()}
			binary.BigEndian.PutUint16(seg[16:], tcpChecksum4(src, dst.Addr(), seg))
		}
		if err := unix.Sendto(fd, seg, 0, to); err != nil {
			return fmt.Errorf("send the SYN: %w", err)
		}
		buf := make([]byte, 2048)
		for deadline := time.Now().Add(time.Second); time.Now().Before(deadline); {
			n, from, err := unix.Recvfrom(fd, buf, 0)
			if err != nil {
				continue // the receive timeout: look again
			}
			tcp := buf[:n]
			if !v6 { // IPv4 raw sockets see the IP header
				if n < 20 || netip.AddrFrom4([4]byte(tcp[16:20])) != src {
					continue
				}
				tcp = tcp[int(tcp[0]&0xf)*4:]
			} else if f, ok := from.(*unix.SockaddrInet6); !ok || netip.AddrFrom16(f.Addr) != dst.Addr() {
				continue
			}
			if len(tcp) >= 20 && binary.BigEndian.Uint16(tcp[0:]) == dst.Port() && binary.BigEndian.Uint16(tcp[2:]) == sport &&
				tcp[13]&0x12 == 0x12 && binary.BigEndian.Uint32(tcp[8:]) == 0x12345679 {
				answered = true
				return nil
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return answered
}

func tcpChecksum4(src, dst netip.Addr, seg []byte) uint16 {
	var sum uint32
	add := func(b []byte) {
		for i := 0; i+1 < len(b); i += 2 {
			sum += uint32(binary.BigEndian.Uint16(b[i:]))
		}
		if len(b)%2 == 1 {
			sum += uint32(b[len(b)-1]) << 8
		}
	}
	s, d := src.As4(), dst.As4()
	add(s[:])
	add(d[:])
	add([]byte{0, unix.IPPROTO_TCP, byte(len(seg) >> 8), byte(len(seg))})
	add(seg)
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	return ^uint16(sum)
}

// A SYN sent on a raw socket has no TCP socket behind it. It is decided as
// a datagram is: by the rules that need no owner (a process rule cannot
// apply), and by the host's mark; its translation ends by idleness. Each
// case is judged on the wire: the SYN-ACK comes back only if the SYN left
// with the right source through the right ISP.
func TestRawSYN(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		rules := `
[[rule]]
name = "raw-rule"
uplink = "isp-b"
protocol = "tcp"
dport = [8080]

[[rule]]
name = "by-process"
uplink = "isp-b"
process = ["e2e.test"]
dport = [80]
`
		e := newEnv(t, dp, rules)
		e.withMetrics(rules)
		if _, err := e.w.Serve(8081); err != nil {
			t.Fatal(err)
		}
		e.hostMark("nft", 8081)
		// Without rerouted, the marked SYN leaves ISP B with ISP A's
		// address and is dropped.
		if rawSYN(t, e.w, networld.HostA, 40001, netip.AddrPortFrom(networld.ServerAddr, 8081)) {
			t.Fatal("a marked raw SYN was answered without rerouted")
		}
		e.start()
		synA, synB := e.counter(e.w.A, "syn"), e.counter(e.w.B, "syn")
		dropped := e.counter(e.w.B, "foreign")
		for i, c := range []struct {
			name  string
			src   netip.Addr
			dst   netip.AddrPort
			viaB  bool
			rule  string
			newSr netip.Addr
		}{
			{"rule", networld.HostA, netip.AddrPortFrom(networld.ServerAddr, 8080), true, "raw-rule", networld.HostB},
			{"rule IPv6", networld.HostA6, netip.AddrPortFrom(networld.Server6, 8080), true, "raw-rule", networld.HostB6},
			{"host mark", networld.HostA, netip.AddrPortFrom(networld.ServerAddr, 8081), true, "host mark", networld.HostB},
			{"process rule (no owner to match)", networld.HostA, netip.AddrPortFrom(networld.ServerAddr, 80), false, "", netip.Addr{}},
		} {
			sport := uint16(41000 + i)
			if !rawSYN(t, e.w, c.src, sport, c.dst) {
				t.Errorf("%s: no SYN-ACK for the raw SYN", c.name)
			}
			if c.rule == "" {
				continue
			}
			line := fmt.Sprintf("[NEW] tcp src=%s dst=%s sport=%d dport=%d mark=100 => src=%s sport=%d dev=hb uid=0 rule=%q socket=none ends=idle",
				c.src, c.dst.Addr(), sport, c.dst.Port(), c.newSr, sport, c.rule)
			if _, err := e.d.WaitFor(line, time.Second); err != nil {
				t.Errorf("%s: %v", c.name, err)
			}
		}
		if n := e.counter(e.w.B, "syn") - synB; n != 3 {
			t.Errorf("ISP B forwarded %d SYNs, want 3", n)
		}
		if n := e.counter(e.w.A, "syn") - synA; n != 1 {
			t.Errorf("ISP A forwarded %d SYNs, want 1 (the process rule's)", n)
		}
		if n := e.counter(e.w.B, "foreign"); n != dropped {
			t.Errorf("ISP B dropped %d packets with a foreign source", n-dropped)
		}
		if v := e.metric("rerouted_raw_syns_total"); v != 4 {
			t.Errorf("rerouted_raw_syns_total = %v, want 4", v)
		}
		// No socket ends these flows: idleness does (2s here).
		eventually(t, 6*time.Second, "the raw SYNs' flows to end by idleness", func() bool {
			for _, f := range e.flows() {
				if f.Proto == "tcp" {
					return false
				}
			}
			return true
		})
		if !strings.Contains(e.d.Output(), "[DESTROY] tcp src="+networld.HostA.String()) {
			t.Error("no [DESTROY] line for the raw SYN's flow")
		}
	})
}
