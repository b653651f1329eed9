package rewrite

import (
	"encoding/binary"
	"errors"
	"net/netip"
)

// ICMP and ICMPv6 errors quote the packet that caused them. For a
// translated flow that quote shows the wire's tuple; to reach the socket
// the error must be addressed to the socket's address and quote its tuple.

// ErrNotICMPError is returned for packets that are not an ICMP or ICMPv6
// error quoting TCP.
var ErrNotICMPError = errors.New("not an ICMP error quoting TCP")

// ICMPError is a parsed view of an ICMP or ICMPv6 error quoting a TCP packet.
type ICMPError struct {
	Type, Code uint8
	Dst        netip.Addr     // outer destination
	L4         int            // offset of the ICMP header
	Inner      int            // offset of the quoted IP header
	InnerL4    int            // offset of the quoted TCP header
	Src, To    netip.AddrPort // the quoted packet's source and destination
}

// ParseICMPError fills e from an IPv4 packet carrying ICMP destination
// unreachable, time exceeded or parameter problem, or an IPv6 packet
// carrying ICMPv6 destination unreachable, packet too big, time exceeded or
// parameter problem, whose quote is a TCP packet with at least its ports.
func ParseICMPError(b []byte, e *ICMPError) error {
	if len(b) < 1 {
		return ErrShort
	}
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 {
			return ErrShort
		}
		ihl := int(b[0]&0x0f) * 4
		if ihl < 20 || b[9] != 1 || len(b) < ihl+8+20+4 {
			return ErrNotICMPError
		}
		switch t := b[ihl]; t {
		case 3, 11, 12:
		default:
			return ErrNotICMPError
		}
		e.Type, e.Code, e.L4, e.Inner = b[ihl], b[ihl+1], ihl, ihl+8
		e.Dst = netip.AddrFrom4([4]byte(b[16:20]))
		in := b[e.Inner:]
		iihl := int(in[0]&0x0f) * 4
		if in[0]>>4 != 4 || iihl < 20 || in[9] != 6 || len(in) < iihl+4 {
			return ErrNotICMPError
		}
		e.InnerL4 = e.Inner + iihl
		e.Src = netip.AddrPortFrom(netip.AddrFrom4([4]byte(in[12:16])), binary.BigEndian.Uint16(b[e.InnerL4:]))
		e.To = netip.AddrPortFrom(netip.AddrFrom4([4]byte(in[16:20])), binary.BigEndian.Uint16(b[e.InnerL4+2:]))
		return nil
	case 6:
		if len(b) < 40+8+40+4 || b[6] != 58 {
			return ErrNotICMPError
		}
		switch t := b[40]; t {
		case 1, 2, 3, 4:
		default:
			return ErrNotICMPError
		}
		e.Type, e.Code, e.L4, e.Inner = b[40], b[41], 40, 48
		e.Dst = netip.AddrFrom16([16]byte(b[24:40]))
		in := b[e.Inner:]
		if in[0]>>4 != 6 || in[6] != 6 { // quoted extension headers are not followed
			return ErrNotICMPError
		}
		e.InnerL4 = e.Inner + 40
		e.Src = netip.AddrPortFrom(netip.AddrFrom16([16]byte(in[8:24])), binary.BigEndian.Uint16(b[e.InnerL4:]))
		e.To = netip.AddrPortFrom(netip.AddrFrom16([16]byte(in[24:40])), binary.BigEndian.Uint16(b[e.InnerL4+2:]))
		return nil
	}
	return ErrVersion
}

// TranslateICMPError readdresses an error parsed into e to the socket's
// address, and rewrites the quoted packet's source to src: the outer
// destination, the quoted source address and port, the quoted IPv4 header
// checksum and the quoted TCP checksum (updated: the quote is usually
// truncated), then the outer IPv4 header checksum and the whole ICMP
// checksum (recomputed).
func TranslateICMPError(b []byte, e *ICMPError, src netip.AddrPort) {
	v4 := b[0]>>4 == 4
	old := e.Src
	// The quoted TCP checksum, if the quote reaches it: the pseudo-header's
	// source and the source port change.
	if ck := e.InnerL4 + 16; ck+2 <= len(b) {
		sum := uint64(^binary.BigEndian.Uint16(b[ck:]))
		sum += sumNot(old.Addr()) + sum16(src.Addr())
		sum += uint64(^old.Port()) + uint64(src.Port())
		binary.BigEndian.PutUint16(b[ck:], ^fold(sum))
	}
	binary.BigEndian.PutUint16(b[e.InnerL4:], src.Port())
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
	var icmp []byte
	if v4 {
		icmp = b[e.L4:int(binary.BigEndian.Uint16(b[2:4]))]
	} else {
		icmp = b[e.L4 : 40+int(binary.BigEndian.Uint16(b[4:6]))]
	}
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
