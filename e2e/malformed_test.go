package e2e

import (
	"encoding/binary"
	"math/rand"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"golang.org/x/sys/unix"
)

// rawSend sends IPv4 packets, headers included, from a namespace.
func rawSend(t *testing.T, ns *networld.NS, dst netip.Addr, pkts [][]byte) {
	t.Helper()
	var fd int
	if err := ns.Do(func() (err error) {
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.IPPROTO_RAW)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	sa := &unix.SockaddrInet4{Addr: dst.As4()}
	for _, p := range pkts {
		unix.Sendto(fd, p, 0, sa) // the kernel refuses some: that is fine
	}
}

func ipv4(src, dst netip.Addr, proto byte, payload []byte) []byte {
	b := make([]byte, 20+len(payload))
	b[0], b[8], b[9] = 0x45, 64, proto
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	s, d := src.As4(), dst.As4()
	copy(b[12:], s[:])
	copy(b[16:], d[:])
	copy(b[20:], payload)
	return b
}

// Malformed packets reach the real daemon, both ways: ICMP errors from the
// internet whose quotes are garbage (they are queued for readdressing), and
// UDP datagrams with lying headers from the host (queued as new flows).
// The daemon survives them all and goes on translating.
func TestMalformedPacketsThroughTheDaemon(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, webRule)
		e.start()
		before := e.queued()
		r := rand.New(rand.NewSource(6))
		// A valid quote: the first bytes of a TCP segment from ISP B's
		// address, as a translated flow's would be.
		quote := ipv4(networld.HostB, networld.ServerAddr, 6, make([]byte, 20))
		binary.BigEndian.PutUint16(quote[20:], 40312)
		binary.BigEndian.PutUint16(quote[22:], 80)
		var errs, dgrams [][]byte
		for i := 0; i < 300; i++ {
			q := append([]byte(nil), quote[:r.Intn(len(quote)+1)]...)
			for n := r.Intn(6); n > 0 && len(q) > 0; n-- {
				q[r.Intn(len(q))] = byte(r.Intn(256))
			}
			icmp := append([]byte{3, byte(r.Intn(16)), 0, 0, 0, 0, byte(r.Intn(256)), byte(r.Intn(256))}, q...)
			errs = append(errs, ipv4(networld.ServerAddr, networld.HostB, 1, icmp))

			udp := make([]byte, 8+r.Intn(64))
			r.Read(udp)
			binary.BigEndian.PutUint16(udp[2:], 53)
			dgrams = append(dgrams, ipv4(networld.HostA, networld.ServerAddr, 17, udp))
		}
		rawSend(t, e.w.Net, networld.HostB, errs)
		rawSend(t, e.w.Host, networld.ServerAddr, dgrams)
		time.Sleep(500 * time.Millisecond)
		if err := e.d.Wait(0); err == nil || !strings.Contains(err.Error(), "still running") {
			t.Fatalf("the daemon exited (%v):\n%s", err, e.d.Output())
		}
		if n := e.queued() - before; n < 300 {
			t.Errorf("only %d of the malformed packets reached the daemon", n)
		}
		if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostB {
			t.Fatalf("after the malformed packets: server saw %v, err %v", peer, err)
		}
	})
}
