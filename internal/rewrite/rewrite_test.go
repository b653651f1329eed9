package rewrite

import (
	"bytes"
	"encoding/binary"
	"errors"
	"math/rand"
	"net"
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// build serializes an IPv4 or IPv6 TCP packet with gopacket, which computes
// the reference checksums.
func build(t testing.TB, src, dst netip.AddrPort, syn bool, opts []layers.TCPOption, payload []byte) []byte {
	tcp := &layers.TCP{
		SrcPort: layers.TCPPort(src.Port()), DstPort: layers.TCPPort(dst.Port()),
		Seq: 12345, Ack: 678, SYN: syn, ACK: !syn, Window: 64240, Options: opts,
	}
	var ip gopacket.NetworkLayer
	var l3 gopacket.SerializableLayer
	if src.Addr().Is4() {
		v4 := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, Id: 7, Flags: layers.IPv4DontFragment,
			SrcIP: net.IP(src.Addr().AsSlice()), DstIP: net.IP(dst.Addr().AsSlice())}
		ip, l3 = v4, v4
	} else {
		v6 := &layers.IPv6{Version: 6, HopLimit: 64, NextHeader: layers.IPProtocolTCP,
			SrcIP: net.IP(src.Addr().AsSlice()), DstIP: net.IP(dst.Addr().AsSlice())}
		ip, l3 = v6, v6
	}
	if err := tcp.SetNetworkLayerForChecksum(ip); err != nil {
		t.Fatal(err)
	}
	buf := gopacket.NewSerializeBuffer()
	err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true},
		l3, tcp, gopacket.Payload(payload))
	if err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), buf.Bytes()...)
}

func randomOptions(r *rand.Rand, mss uint16) []layers.TCPOption {
	var opts []layers.TCPOption
	if r.Intn(4) != 0 {
		opts = append(opts, layers.TCPOption{OptionType: layers.TCPOptionKindMSS, OptionLength: 4,
			OptionData: binary.BigEndian.AppendUint16(nil, mss)})
	}
	if r.Intn(2) == 0 {
		opts = append(opts, layers.TCPOption{OptionType: layers.TCPOptionKindSACKPermitted, OptionLength: 2})
	}
	if r.Intn(2) == 0 {
		ts := make([]byte, 8)
		r.Read(ts)
		opts = append(opts, layers.TCPOption{OptionType: layers.TCPOptionKindNop},
			layers.TCPOption{OptionType: layers.TCPOptionKindTimestamps, OptionLength: 10, OptionData: ts})
	}
	if r.Intn(2) == 0 {
		opts = append(opts, layers.TCPOption{OptionType: layers.TCPOptionKindWindowScale, OptionLength: 3, OptionData: []byte{7}})
	}
	r.Shuffle(len(opts), func(i, j int) { opts[i], opts[j] = opts[j], opts[i] })
	return opts
}

func randomAddrPort(r *rand.Rand, v6 bool) netip.AddrPort {
	port := uint16(1 + r.Intn(65535))
	if v6 {
		var a [16]byte
		r.Read(a[:])
		a[0], a[1], a[2], a[3] = 0x20, 0x01, 0x0d, 0xb8
		return netip.AddrPortFrom(netip.AddrFrom16(a), port)
	}
	var a [4]byte
	r.Read(a[:])
	return netip.AddrPortFrom(netip.AddrFrom4(a), port)
}

// pseudoOnly replaces a packet's TCP checksum with the pseudo-header sum, as
// a packet with CHECKSUM_PARTIAL reaches userspace.
func pseudoOnly(b []byte, tc *Packet) {
	var p uint64
	var n int
	if b[0]>>4 == 4 {
		n = int(binary.BigEndian.Uint16(b[2:4])) - tc.L4
		p = sum(b[12:20], 0)
	} else {
		n = int(binary.BigEndian.Uint16(b[4:6]))
		p = sum(b[8:40], 0)
	}
	binary.BigEndian.PutUint16(b[tc.L4+16:], fold(p+6+uint64(n)))
}

// TestRewriteMatchesGopacket rewrites many random packets and checks every
// byte, checksums included, against gopacket serializing the expected packet.
func TestRewriteMatchesGopacket(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	for i := 0; i < 3000; i++ {
		v6 := i%3 == 2
		src, dst, newSrc := randomAddrPort(r, v6), randomAddrPort(r, v6), randomAddrPort(r, v6)
		syn := r.Intn(2) == 0
		opts := randomOptions(r, uint16(500+r.Intn(9000)))
		payload := make([]byte, r.Intn(1500))
		if syn {
			payload = payload[:0]
		}
		r.Read(payload)
		in := build(t, src, dst, syn, opts, payload)
		want := build(t, newSrc, dst, syn, opts, payload)

		var tc Packet
		if err := ParseTCP(in, &tc); err != nil {
			t.Fatalf("packet %d: %v", i, err)
		}
		if tc.Src != src || tc.Dst != dst || (tc.Flags&SYN != 0) != syn {
			t.Fatalf("packet %d: parsed %+v, want %v -> %v syn=%v", i, tc, src, dst, syn)
		}
		if i%2 == 1 {
			pseudoOnly(in, &tc) // offloaded checksum input must not matter
		}
		SetSource(in, &tc, newSrc)
		Checksum(in, &tc)
		if !bytes.Equal(in, want) {
			t.Fatalf("packet %d (v6=%v syn=%v opts=%d payload=%d):\n got %x\nwant %x", i, v6, syn, len(opts), len(payload), in, want)
		}
		// Decode with gopacket as an independent check that it is a valid packet.
		first := layers.LayerTypeIPv4
		if v6 {
			first = layers.LayerTypeIPv6
		}
		p := gopacket.NewPacket(in, first, gopacket.Default)
		if p.ErrorLayer() != nil {
			t.Fatalf("packet %d: gopacket cannot decode: %v", i, p.ErrorLayer().Error())
		}
	}
}

// Replies are restored with SetDestination: checked the same way.
func TestSetDestinationMatchesGopacket(t *testing.T) {
	r := rand.New(rand.NewSource(3))
	for i := 0; i < 1000; i++ {
		v6 := i%3 == 2
		src, dst, newDst := randomAddrPort(r, v6), randomAddrPort(r, v6), randomAddrPort(r, v6)
		payload := make([]byte, r.Intn(9000))
		r.Read(payload)
		opts := randomOptions(r, 1460)
		in := build(t, src, dst, false, opts, payload)
		want := build(t, src, newDst, false, opts, payload)
		var tc Packet
		if err := ParseTCP(in, &tc); err != nil {
			t.Fatal(err)
		}
		if i%2 == 1 {
			pseudoOnly(in, &tc)
		}
		SetDestination(in, &tc, newDst)
		Checksum(in, &tc)
		if !bytes.Equal(in, want) {
			t.Fatalf("packet %d differs from gopacket's", i)
		}
	}
}

func TestClampMSS(t *testing.T) {
	src, dst := netip.MustParseAddrPort("198.51.100.2:40000"), netip.MustParseAddrPort("192.0.2.80:80")
	mssOpt := func(v uint16) layers.TCPOption {
		return layers.TCPOption{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: binary.BigEndian.AppendUint16(nil, v)}
	}
	nop := layers.TCPOption{OptionType: layers.TCPOptionKindNop}
	sack := layers.TCPOption{OptionType: layers.TCPOptionKindSACKPermitted, OptionLength: 2}
	cases := []struct {
		name    string
		opts    []layers.TCPOption
		clamp   uint16
		old     uint16
		changed bool
	}{
		{"lowered", []layers.TCPOption{mssOpt(1460)}, 1240, 1460, true},
		{"already lower", []layers.TCPOption{mssOpt(1200)}, 1240, 1200, false},
		{"after other options", []layers.TCPOption{nop, sack, nop, mssOpt(8960)}, 1460, 8960, true},
		{"no mss option", []layers.TCPOption{sack}, 1240, 0, false},
		{"no options", nil, 1240, 0, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := build(t, src, dst, true, c.opts, nil)
			var tc Packet
			if err := ParseTCP(b, &tc); err != nil {
				t.Fatal(err)
			}
			old, changed := ClampMSS(b, &tc, c.clamp)
			if old != c.old || changed != c.changed {
				t.Fatalf("ClampMSS = %d, %v; want %d, %v", old, changed, c.old, c.changed)
			}
			Checksum(b, &tc)
			p := gopacket.NewPacket(b, layers.LayerTypeIPv4, gopacket.Default)
			tcp := p.Layer(layers.LayerTypeTCP).(*layers.TCP)
			for _, o := range tcp.Options {
				if o.OptionType == layers.TCPOptionKindMSS {
					got := binary.BigEndian.Uint16(o.OptionData)
					if want := min(c.old, c.clamp); got != want {
						t.Fatalf("MSS on packet = %d, want %d", got, want)
					}
				}
			}
			// The checksum over the whole segment must verify.
			want := build(t, src, dst, true, tcp.Options, nil)
			if !bytes.Equal(b, want) {
				t.Fatalf("after clamp\n got %x\nwant %x", b, want)
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	good := build(t, netip.MustParseAddrPort("198.51.100.2:1"), netip.MustParseAddrPort("192.0.2.80:80"), true, nil, nil)
	var tc Packet
	cases := map[string]struct {
		b    []byte
		want error
	}{
		"empty":     {nil, ErrShort},
		"truncated": {good[:30], ErrHeaderBytes},
		"version":   {append([]byte{0x55}, good[1:]...), ErrVersion},
		"udp":       {func() []byte { b := bytes.Clone(good); b[9] = 17; return b }(), ErrNotTCP},
		"fragment":  {func() []byte { b := bytes.Clone(good); b[6] |= 0x20; return b }(), ErrFragment},
		"bad doff":  {func() []byte { b := bytes.Clone(good); b[20+12] = 0x40; return b }(), ErrHeaderBytes},
	}
	for name, c := range cases {
		if err := ParseTCP(c.b, &tc); err != c.want {
			t.Errorf("%s: err = %v, want %v", name, err, c.want)
		}
	}
}

func TestNoAllocations(t *testing.T) {
	b := build(t, netip.MustParseAddrPort("198.51.100.2:40000"), netip.MustParseAddrPort("192.0.2.80:80"), true,
		randomOptions(rand.New(rand.NewSource(2)), 1460), nil)
	newSrc := netip.MustParseAddrPort("203.0.113.2:40000")
	allocs := testing.AllocsPerRun(1000, func() {
		var tc Packet
		if ParseTCP(b, &tc) != nil {
			panic("parse")
		}
		SetSource(b, &tc, newSrc)
		ClampMSS(b, &tc, 1400)
		Checksum(b, &tc)
	})
	if allocs != 0 {
		t.Fatalf("rewrite path allocates %.1f times per packet", allocs)
	}
}

// BenchmarkRewriteSYN is one SYN's rewrite. Informational: its time is
// compared to nothing; the floor is TestNoAllocations.
func BenchmarkRewriteSYN(b *testing.B) {
	pkt := build(b, netip.MustParseAddrPort("198.51.100.2:40000"), netip.MustParseAddrPort("192.0.2.80:80"), true,
		randomOptions(rand.New(rand.NewSource(2)), 1460), nil)
	newSrc := netip.MustParseAddrPort("203.0.113.2:40000")
	b.ReportAllocs()
	for b.Loop() {
		var tc Packet
		_ = ParseTCP(pkt, &tc)
		SetSource(pkt, &tc, newSrc)
		ClampMSS(pkt, &tc, 1400)
		Checksum(pkt, &tc)
	}
}

// ErrNotTCP is what parseTCP returns for anything but TCP.
var ErrNotTCP = errors.New("not a TCP packet")

// ParseTCP is Parse for TCP only, for the tests of TCP rewriting.
func ParseTCP(b []byte, t *Packet) error {
	if err := Parse(b, t); err != nil {
		if err == ErrProtocol {
			return ErrNotTCP
		}
		return err
	}
	if t.Proto != ipproto.TCP {
		return ErrNotTCP
	}
	return nil
}
