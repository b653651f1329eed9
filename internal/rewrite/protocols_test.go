package rewrite

import (
	"bytes"
	"math/rand"
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// buildDatagram serializes a UDP datagram, or an ICMP/ICMPv6 echo of type
// typ with src's port as its identifier, with gopacket's checksums.
func buildDatagram(t testing.TB, proto ipproto.Proto, typ uint8, src, dst netip.AddrPort, payload []byte) []byte {
	var l3 gopacket.SerializableLayer
	var nl gopacket.NetworkLayer
	if src.Addr().Is4() {
		v4 := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocol(proto), Id: 9,
			SrcIP: net.IP(src.Addr().AsSlice()), DstIP: net.IP(dst.Addr().AsSlice())}
		l3, nl = v4, v4
	} else {
		v6 := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocol(proto),
			SrcIP: net.IP(src.Addr().AsSlice()), DstIP: net.IP(dst.Addr().AsSlice())}
		l3, nl = v6, v6
	}
	var l4 gopacket.SerializableLayer
	switch proto {
	case ipproto.UDP:
		u := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
		if err := u.SetNetworkLayerForChecksum(nl); err != nil {
			t.Fatal(err)
		}
		l4 = u
	case ipproto.ICMP:
		l4 = &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(typ, 0), Id: src.Port(), Seq: 3}
	case ipproto.ICMPv6:
		ic := &layers.ICMPv6{TypeCode: layers.CreateICMPv6TypeCode(typ, 0)}
		if err := ic.SetNetworkLayerForChecksum(nl); err != nil {
			t.Fatal(err)
		}
		// The echo's identifier and sequence number open its body.
		payload = append([]byte{byte(src.Port() >> 8), byte(src.Port()), 0, 3}, payload...)
		l4 = ic
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		l3, l4, gopacket.Payload(payload)); err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), buf.Bytes()...)
}

// UDP and ICMP echo, both families: outbound source rewrites and inbound
// destination rewrites give gopacket's bytes exactly.
func TestDatagramsMatchGopacket(t *testing.T) {
	r := rand.New(rand.NewSource(5))
	cases := []struct {
		proto       ipproto.Proto
		req, rep    uint8
		sock, wire  string
		server      string
		sameIDPorts bool
	}{
		{ipproto.UDP, 0, 0, "198.51.100.2:40312", "203.0.113.2:51000", "192.0.2.80:53", false},
		{ipproto.UDP, 0, 0, "[2001:db8:a::2]:40312", "[2001:db8:b::2]:51000", "[2001:db8:80::80]:53", false},
		{ipproto.ICMP, EchoRequest4, EchoReply4, "198.51.100.2:4242", "203.0.113.2:4242", "192.0.2.80:4242", true},
		{ipproto.ICMPv6, EchoRequest6, EchoReply6, "[2001:db8:a::2]:4242", "[2001:db8:b::2]:4242", "[2001:db8:80::80]:4242", true},
	}
	for _, c := range cases {
		for _, n := range []int{0, 1, 57, 1400} {
			payload := make([]byte, n)
			r.Read(payload)
			sock, wire, server := netip.MustParseAddrPort(c.sock), netip.MustParseAddrPort(c.wire), netip.MustParseAddrPort(c.server)
			out := buildDatagram(t, c.proto, c.req, sock, server, payload)
			var p Packet
			if err := Parse(out, &p); err != nil {
				t.Fatalf("%s: %v", c.sock, err)
			}
			if p.Proto != c.proto || p.Src != sock || (c.proto == ipproto.UDP && p.Dst != server) || (c.sameIDPorts && p.Dst.Port() != sock.Port()) {
				t.Fatalf("%s: parsed %+v", c.sock, p)
			}
			SetSource(out, &p, wire)
			Checksum(out, &p)
			if want := buildDatagram(t, c.proto, c.req, wire, server, payload); !bytes.Equal(out, want) {
				t.Fatalf("%s, %d bytes, outbound:\n got %x\nwant %x", c.sock, n, out, want)
			}

			// The reply, from the server's side: back to the socket.
			from := server
			if c.sameIDPorts {
				from = netip.AddrPortFrom(server.Addr(), wire.Port())
			}
			in := buildDatagram(t, c.proto, c.rep, from, wire, payload)
			if err := Parse(in, &p); err != nil {
				t.Fatalf("%s reply: %v", c.sock, err)
			}
			if p.Dst != wire {
				t.Fatalf("%s reply: parsed %+v", c.sock, p)
			}
			SetDestination(in, &p, sock)
			Checksum(in, &p)
			to := sock
			if want := buildDatagram(t, c.proto, c.rep, from, to, payload); !bytes.Equal(in, want) {
				t.Fatalf("%s, %d bytes, reply:\n got %x\nwant %x", c.sock, n, in, want)
			}
		}
	}
}

// An IPv4 UDP datagram sent without a checksum keeps none.
func TestUDPWithoutChecksum(t *testing.T) {
	b := buildDatagram(t, ipproto.UDP, 0, netip.MustParseAddrPort("198.51.100.2:40312"), netip.MustParseAddrPort("192.0.2.80:53"), []byte("query"))
	b[20+6], b[20+7] = 0, 0
	var p Packet
	if err := Parse(b, &p); err != nil {
		t.Fatal(err)
	}
	SetSource(b, &p, netip.MustParseAddrPort("203.0.113.2:51000"))
	Checksum(b, &p)
	if b[26] != 0 || b[27] != 0 {
		t.Fatalf("checksum %x, want none", b[26:28])
	}
}

// Parse takes only echoes among ICMP messages.
func TestParseICMPOnlyEchoes(t *testing.T) {
	var p Packet
	for typ, want := range map[uint8]error{EchoRequest4: nil, EchoReply4: nil, 3: ErrProtocol, 13: ErrProtocol} {
		b := buildDatagram(t, ipproto.ICMP, typ, netip.MustParseAddrPort("198.51.100.2:7"), netip.MustParseAddrPort("192.0.2.80:7"), nil)
		if err := Parse(b, &p); err != want {
			t.Errorf("ICMP type %d: %v, want %v", typ, err, want)
		}
	}
	// ICMPv4 types inside ICMPv6 are not echoes.
	b := buildDatagram(t, ipproto.ICMPv6, EchoRequest4, netip.MustParseAddrPort("[2001:db8:a::2]:7"), netip.MustParseAddrPort("[2001:db8:80::80]:7"), nil)
	if err := Parse(b, &p); err != ErrProtocol {
		t.Errorf("ICMPv6 type 8: %v, want ErrProtocol", err)
	}
}

// Errors quoting a UDP datagram or an echo request are readdressed exactly
// as gopacket builds the error the socket's own packet would have caused.
func TestTranslateICMPErrorQuotingDatagrams(t *testing.T) {
	cases := []struct {
		proto          ipproto.Proto
		typ            uint8
		router, server string
		wire, sock     string
	}{
		{ipproto.UDP, 0, "192.0.2.5", "192.0.2.80:53", "203.0.113.2:51000", "198.51.100.2:40312"},
		{ipproto.UDP, 0, "2001:db8:ffb::1", "[2001:db8:80::80]:53", "[2001:db8:b::2]:51000", "[2001:db8:a::2]:40312"},
		{ipproto.ICMP, EchoRequest4, "192.0.2.5", "192.0.2.80:4242", "203.0.113.2:4242", "198.51.100.2:4242"},
		{ipproto.ICMPv6, EchoRequest6, "2001:db8:ffb::1", "[2001:db8:80::80]:4242", "[2001:db8:b::2]:4242", "[2001:db8:a::2]:4242"},
	}
	for _, c := range cases {
		for _, n := range []int{28, 48, 68, 548} {
			wire, sock, server := netip.MustParseAddrPort(c.wire), netip.MustParseAddrPort(c.sock), netip.MustParseAddrPort(c.server)
			router := netip.MustParseAddr(c.router)
			payload := bytes.Repeat([]byte{0xab}, 600)
			in := icmpError(t, router, buildDatagram(t, c.proto, c.typ, wire, server, payload), n)
			want := icmpError(t, router, buildDatagram(t, c.proto, c.typ, sock, server, payload), n)
			var e ICMPError
			err := ParseICMPError(in, &e)
			if !router.Is4() && n < 40+6 {
				if err != ErrNotICMPError {
					t.Fatalf("%s, quote %d: err %v, want ErrNotICMPError", c.wire, n, err)
				}
				continue
			}
			if err != nil {
				t.Fatalf("%s, quote %d: %v", c.wire, n, err)
			}
			if e.InnerProto != c.proto || e.Src != wire || (c.proto == ipproto.UDP && e.To != server) {
				t.Fatalf("%s, quote %d: parsed %+v", c.wire, n, e)
			}
			TranslateICMPError(in, &e, sock)
			if !bytes.Equal(in, want) {
				t.Fatalf("%s, quote %d:\n got %x\nwant %x", c.wire, n, in, want)
			}
		}
	}
}
