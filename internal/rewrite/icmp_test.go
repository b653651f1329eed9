package rewrite

import (
	"bytes"
	"math/rand"
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
)

// icmpError builds the error a router at from sends to quote's source,
// quoting the first n bytes of quote, with gopacket's checksums.
func icmpError(t testing.TB, from netip.Addr, quote []byte, n int) []byte {
	to := netip.AddrFrom4([4]byte(quote[12:16]))
	if quote[0]>>4 == 6 {
		to = netip.AddrFrom16([16]byte(quote[8:24]))
	}
	quote = quote[:min(n, len(quote))]
	buf := gopacket.NewSerializeBuffer()
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	var err error
	if from.Is4() {
		ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: net.IP(from.AsSlice()), DstIP: net.IP(to.AsSlice())}
		icmp := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(3, 4), Seq: 1280}
		err = gopacket.SerializeLayers(buf, opts, ip, icmp, gopacket.Payload(quote))
	} else {
		ip := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolICMPv6, SrcIP: net.IP(from.AsSlice()), DstIP: net.IP(to.AsSlice())}
		icmp := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(2, 0)}
		if err := icmp.SetNetworkLayerForChecksum(ip); err != nil {
			t.Fatal(err)
		}
		mtu := []byte{0, 0, 0x05, 0x00} // 1280
		err = gopacket.SerializeLayers(buf, opts, ip, icmp, gopacket.Payload(append(mtu, quote...)))
	}
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), buf.Bytes()...)
}

func TestTranslateICMPErrorMatchesGopacket(t *testing.T) {
	r := rand.New(rand.NewSource(4))
	cases := []struct {
		router, server, wire, sock string
	}{
		{"192.0.2.5", "192.0.2.80:80", "203.0.113.2:51000", "198.51.100.2:40312"},
		{"2001:db8:ffb::1", "[2001:db8:80::80]:443", "[2001:db8:b::2]:51000", "[2001:db8:a::2]:40312"},
	}
	for _, c := range cases {
		for _, n := range []int{28, 48, 68, 548, 1232} { // quotes of various lengths
			payload := make([]byte, 1400)
			r.Read(payload)
			wire, sock := netip.MustParseAddrPort(c.wire), netip.MustParseAddrPort(c.sock)
			server := netip.MustParseAddrPort(c.server)
			router := netip.MustParseAddr(c.router)
			opts := randomOptions(r, 1460)
			in := icmpError(t, router, build(t, wire, server, false, opts, payload), n)
			want := icmpError(t, router, build(t, sock, server, false, opts, payload), n)

			var e ICMPError
			err := ParseICMPError(in, &e)
			if !router.Is4() && n < 40+4 { // the quote cannot hold the IPv6 header and the ports
				if err != ErrNotICMPError {
					t.Fatalf("%s, quote %d: err %v, want ErrNotICMPError", c.router, n, err)
				}
				continue
			}
			if err != nil {
				t.Fatalf("%s, quote %d: %v", c.router, n, err)
			}
			if e.Src != wire || e.To != server || e.Dst != wire.Addr() {
				t.Fatalf("%s, quote %d: parsed %+v", c.router, n, e)
			}
			TranslateICMPError(in, &e, sock)
			if !bytes.Equal(in, want) {
				t.Fatalf("%s, quote %d:\n got %x\nwant %x", c.router, n, in, want)
			}
		}
	}
}

func TestParseICMPErrorRejects(t *testing.T) {
	var e ICMPError
	echo := func() []byte {
		buf := gopacket.NewSerializeBuffer()
		gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
			&layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolICMPv4, SrcIP: net.IP{192, 0, 2, 80}, DstIP: net.IP{203, 0, 113, 2}},
			&layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(0, 0)}, gopacket.Payload(make([]byte, 56)))
		return buf.Bytes()
	}()
	if err := ParseICMPError(echo, &e); err != ErrNotICMPError {
		t.Errorf("echo reply: %v", err)
	}
	tcp := build(t, netip.MustParseAddrPort("198.51.100.2:1"), netip.MustParseAddrPort("192.0.2.80:80"), true, nil, nil)
	if err := ParseICMPError(tcp, &e); err != ErrNotICMPError {
		t.Errorf("TCP packet: %v", err)
	}
	short := icmpError(t, netip.MustParseAddr("192.0.2.5"), tcp, 20) // no ports quoted
	if err := ParseICMPError(short, &e); err != ErrNotICMPError {
		t.Errorf("quote without ports: %v", err)
	}
}
