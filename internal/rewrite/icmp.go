package rewrite

import (
	"encoding/binary"
	"errors"
	"net/netip"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// ICMP and ICMPv6 errors quote the packet that caused them. For a
// translated flow that quote shows the wire's tuple; to reach the socket
// the error must be addressed to the socket's address and quote its tuple.

// ErrNotICMPError is returned for packets that are not an ICMP or ICMPv6
// error quoting TCP, UDP or an echo request.
var ErrNotICMPError = errors.New("not an ICMP error quoting TCP, UDP or an echo request")

// ICMPError is a parsed view of an ICMP or ICMPv6 error quoting a TCP or
// UDP packet or an echo request.
type ICMPError struct {
	Type, Code uint8
	Dst        netip.Addr     // outer destination
	L4         int            // offset of the ICMP header
	Inner      int            // offset of the quoted IP header
	InnerL4    int            // offset of the quoted transport header
	InnerProto ipproto.Proto  // the quoted packet's protocol
	Src, To    netip.AddrPort // the quoted packet's source and destination (an echo's identifier as ports)
	end        int            // where the packet ends, by its length field
}

// ParseICMPError fills e from an IPv4 packet carrying ICMP destination
// unreachable, time exceeded or parameter problem, or an IPv6 packet
// carrying ICMPv6 destination unreachable, packet too big, time exceeded or
// parameter problem, whose quote is a TCP or UDP packet with at least its
// ports, or an echo request with at least its identifier.
func ParseICMPError(b []byte, e *ICMPError) error {
	l4, end, proto, err := network(b)
	if err != nil {
		return err
	}
	v4 := b[0]>>4 == 4
	iph := 40 // the quoted IP header
	switch {
	case v4 && proto == ipproto.ICMP && end >= l4+8+20:
		if t := b[l4]; t != 3 && t != 11 && t != 12 {
			return ErrNotICMPError
		}
		iph = int(b[l4+8]&0x0f) * 4
		if b[l4+8]>>4 != 4 || iph < 20 {
			return ErrNotICMPError
		}
		e.InnerProto = ipproto.Proto(b[l4+8+9])
	case !v4 && proto == ipproto.ICMPv6 && end >= l4+8+40:
		if t := b[l4]; t < 1 || t > 4 {
			return ErrNotICMPError
		}
		if b[l4+8]>>4 != 6 { // quoted extension headers are not followed
			return ErrNotICMPError
		}
		e.InnerProto = ipproto.Proto(b[l4+8+6])
	default:
		return ErrNotICMPError
	}
	e.Type, e.Code, e.L4, e.Inner = b[l4], b[l4+1], l4, l4+8
	e.InnerL4 = e.Inner + iph
	switch p := e.InnerProto; {
	case p == ipproto.TCP || p == ipproto.UDP:
		if end < e.InnerL4+4 { // the quote must hold the ports
			return ErrNotICMPError
		}
	case p == ipproto.ICMP && v4, p == ipproto.ICMPv6 && !v4:
		// An echo request: the quote must hold its identifier.
		if end < e.InnerL4+6 || (b[e.InnerL4] != EchoRequest4 && b[e.InnerL4] != EchoRequest6) {
			return ErrNotICMPError
		}
	default:
		return ErrNotICMPError
	}
	in := b[e.Inner:]
	sport := binary.BigEndian.Uint16(b[e.InnerL4+portOffset(e.InnerProto, true):])
	dport := binary.BigEndian.Uint16(b[e.InnerL4+portOffset(e.InnerProto, false):])
	if v4 {
		e.Dst = netip.AddrFrom4([4]byte(b[16:20]))
		e.Src = netip.AddrPortFrom(netip.AddrFrom4([4]byte(in[12:16])), sport)
		e.To = netip.AddrPortFrom(netip.AddrFrom4([4]byte(in[16:20])), dport)
	} else {
		e.Dst = netip.AddrFrom16([16]byte(b[24:40]))
		e.Src = netip.AddrPortFrom(netip.AddrFrom16([16]byte(in[8:24])), sport)
		e.To = netip.AddrPortFrom(netip.AddrFrom16([16]byte(in[24:40])), dport)
	}
	e.end = end
	return nil
}

// TranslateICMPError readdresses an error parsed into e to the socket's
// address, and rewrites the quoted packet's source to src: the outer
// destination, the quoted source address and port (an echo's identifier),
// the quoted IPv4 header checksum and the quoted transport checksum
// (updated: the quote is usually truncated), then the outer IPv4 header
// checksum and the whole ICMP checksum (recomputed).
func TranslateICMPError(b []byte, e *ICMPError, src netip.AddrPort) {
	v4 := b[0]>>4 == 4
	old := e.Src
	// The quoted transport checksum, if the quote reaches it: the
	// pseudo-header's source and the source port change. ICMP's covers
	// neither; a UDP datagram sent without a checksum keeps none.
	p := e.InnerProto
	if ck := e.InnerL4 + checksumOffset(p); p != ipproto.ICMP && ck+2 <= e.end && (p != ipproto.UDP || b[ck]|b[ck+1] != 0) {
		sum := uint64(^binary.BigEndian.Uint16(b[ck:]))
		sum += sumNot(old.Addr()) + sum16(src.Addr())
		sum += uint64(^old.Port()) + uint64(src.Port())
		c := ^fold(sum)
		if c == 0 && p == ipproto.UDP {
			c = 0xffff
		}
		binary.BigEndian.PutUint16(b[ck:], c)
	}
	binary.BigEndian.PutUint16(b[e.InnerL4+portOffset(p, true):], src.Port())
	if v4 {
		a := src.Addr().As4()
		copy(b[e.Inner+12:], a[:])
		d := src.Addr().As4()
		copy(b[16:20], d[:])
		ih := b[e.Inner:e.InnerL4]
		ih[10], ih[11] = 0, 0
		binary.BigEndian.PutUint16(ih[10:], ^fold(sum(ih, 0)))
		b[10], b[11] = 0, 0
		binary.BigEndian.PutUint16(b[10:], ^fold(sum(b[:e.L4], 0)))
	} else {
		a := src.Addr().As16()
		copy(b[e.Inner+8:], a[:])
		copy(b[24:40], a[:])
	}
	e.Dst, e.Src = src.Addr(), src
	icmp := b[e.L4:e.end]
	icmp[2], icmp[3] = 0, 0
	var acc uint64
	if !v4 { // ICMPv6 covers a pseudo-header
		acc = sum(b[8:40], 0) + uint64(len(icmp)) + 58
	}
	binary.BigEndian.PutUint16(icmp[2:], ^fold(sum(icmp, acc)))
}

// sum16 is an address's one's-complement sum, unfolded.
func sum16(a netip.Addr) uint64 {
	if a.Is4() {
		a4 := a.As4()
		return sum(a4[:], 0)
	}
	a16 := a.As16()
	return sum(a16[:], 0)
}

// sumNot is the one's-complement negation of an address's sum.
func sumNot(a netip.Addr) uint64 { return uint64(^fold(sum16(a))) }
