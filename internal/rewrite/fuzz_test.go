package rewrite

import (
	"net/netip"
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// FuzzRewrite feeds arbitrary bytes through the daemon's packet path: parse,
// then rewrite only what parsed. It must never panic, and a packet that
// parsed must parse again to the rewritten tuple.
func FuzzRewrite(f *testing.F) {
	for _, c := range [][2]string{
		{"198.51.100.2:40312", "192.0.2.80:80"},
		{"[2001:db8:a::2]:40312", "[2001:db8:80::80]:80"},
	} {
		src, dst := netip.MustParseAddrPort(c[0]), netip.MustParseAddrPort(c[1])
		router := netip.MustParseAddr("192.0.2.5")
		icmp, echo := ipproto.ICMP, uint8(EchoRequest4)
		if src.Addr().Is6() {
			router = netip.MustParseAddr("2001:db8:ffb::1")
			icmp, echo = ipproto.ICMPv6, EchoRequest6
		}
		tcp := build(f, src, dst, true, nil, nil)
		udp := buildDatagram(f, ipproto.UDP, 0, src, dst, []byte("query"))
		f.Add(tcp)
		f.Add(udp)
		f.Add(buildDatagram(f, icmp, echo, src, dst, make([]byte, 16)))
		f.Add(icmpError(f, router, udp, 548))
	}
	f.Fuzz(func(t *testing.T, b []byte) { exercise(t, b) })
}

var newSrc4, newSrc6 = netip.MustParseAddrPort("203.0.113.2:1"), netip.MustParseAddrPort("[2001:db8:b::2]:1")

// exercise runs b through the daemon's packet path: parse, then rewrite
// only what parsed, both ways. A packet that parsed must parse again to the
// rewritten source.
func exercise(t testing.TB, b []byte) {
	var p Packet
	if Parse(b, &p) == nil {
		ns := newSrc4
		if p.Src.Addr().Is6() {
			ns = newSrc6
		}
		if p.Proto == ipproto.ICMP || p.Proto == ipproto.ICMPv6 {
			ns = netip.AddrPortFrom(ns.Addr(), p.Src.Port()) // an echo keeps its identifier
		}
		SetSource(b, &p, ns)
		ClampMSS(b, &p, 1200)
		Checksum(b, &p)
		var again Packet
		if err := Parse(b, &again); err != nil || again.Src != ns {
			t.Fatalf("after rewriting to %v: %+v, %v", ns, again, err)
		}
		SetDestination(b, &p, ns)
		Checksum(b, &p)
	}
	var e ICMPError
	if ParseICMPError(b, &e) == nil {
		ns := newSrc4
		if e.Src.Addr().Is6() {
			ns = newSrc6
		}
		TranslateICMPError(b, &e, ns)
	}
}
