package rewrite

import (
	"encoding/binary"
	"math/rand"
	"net/netip"
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// Malformed packets never crash the rewrite path the daemon runs: parse,
// then rewrite only what parsed. Valid TCP and UDP packets, echoes and ICMP
// errors are corrupted at random: bytes, length fields, truncation.
func TestMalformedPacketsNeverPanic(t *testing.T) {
	r := rand.New(rand.NewSource(5))
	var seeds [][]byte
	for _, c := range [][3]string{
		{"198.51.100.2:40312", "192.0.2.80:80", "192.0.2.5"},
		{"[2001:db8:a::2]:40312", "[2001:db8:80::80]:80", "2001:db8:ffb::1"},
	} {
		src, dst := netip.MustParseAddrPort(c[0]), netip.MustParseAddrPort(c[1])
		p := build(t, src, dst, true, randomOptions(r, 1460), nil)
		seeds = append(seeds, p, build(t, src, dst, false, nil, make([]byte, 300)),
			icmpError(t, netip.MustParseAddr(c[2]), build(t, src, dst, false, nil, make([]byte, 600)), 548))
		icmp, echo := ipproto.ICMP, uint8(EchoRequest4)
		if src.Addr().Is6() {
			icmp, echo = ipproto.ICMPv6, EchoRequest6
		}
		udp := buildDatagram(t, ipproto.UDP, 0, src, dst, make([]byte, 100))
		ping := buildDatagram(t, icmp, echo, src, dst, make([]byte, 56))
		seeds = append(seeds, udp, ping,
			icmpError(t, netip.MustParseAddr(c[2]), udp, 548), icmpError(t, netip.MustParseAddr(c[2]), ping, 548))
	}
	for i := 0; i < 200000; i++ {
		b := append([]byte(nil), seeds[r.Intn(len(seeds))]...)
		switch r.Intn(4) {
		case 0: // flip bytes
			for n := 1 + r.Intn(4); n > 0; n-- {
				b[r.Intn(len(b))] = byte(r.Intn(256))
			}
		case 1: // lie about the length
			if b[0]>>4 == 4 {
				binary.BigEndian.PutUint16(b[2:], uint16(r.Intn(0x10000)))
			} else {
				binary.BigEndian.PutUint16(b[4:], uint16(r.Intn(0x10000)))
			}
		case 2: // truncate
			b = b[:r.Intn(len(b))]
		case 3: // corrupt a header length (IHL, data offset, quoted IHL)
			b[r.Intn(min(len(b), 80))] ^= 0xf0
		}
		func() {
			defer func() {
				if v := recover(); v != nil {
					t.Fatalf("packet %x: panic %v", b, v)
				}
			}()
			exercise(t, b)
		}()
	}
}
