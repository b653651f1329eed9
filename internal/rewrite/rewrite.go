// Package rewrite parses and rewrites IP packets in place: source address and
// port (the identifier of an ICMP echo), the TCP MSS option, and complete
// checksums, for TCP, UDP and ICMP/ICMPv6 echo over IPv4 and IPv6.
//
// Nothing here allocates. Checksums are always recomputed in full: a packet
// handed back to the kernel with a modified verdict is treated as
// CHECKSUM_NONE, and the packet may have arrived with only the pseudo-header
// sum in its TCP checksum field (checksum offload), which an incremental update
// would carry onto the wire.
package rewrite

import (
	"encoding/binary"
	"errors"
	"net/netip"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// Parse errors. They are values so that the packet path does not allocate.
var (
	ErrShort       = errors.New("packet too short")
	ErrVersion     = errors.New("not an IPv4 or IPv6 packet")
	ErrProtocol    = errors.New("not TCP, UDP or an ICMP echo")
	ErrFragment    = errors.New("fragmented packet")
	ErrHeaderBytes = errors.New("bad header length")
)

// TCP flag bits.
const (
	FIN = 0x01
	SYN = 0x02
	RST = 0x04
	PSH = 0x08
	ACK = 0x10
)

// ICMP echo types, by family.
const (
	EchoRequest4 = 8
	EchoReply4   = 0
	EchoRequest6 = 128
	EchoReply6   = 129
)

// Packet is a parsed view of an IP packet carrying TCP, UDP, or an ICMP or
// ICMPv6 echo request or reply. An echo's identifier plays the part of both
// ports: it is what tells one ping socket's flow from another's.
type Packet struct {
	Proto    ipproto.Proto // TCP, UDP, ICMP or ICMPv6
	Src, Dst netip.AddrPort
	L4       int   // offset of the transport header
	Flags    uint8 // TCP: the flags byte; ICMP: the type
	end      int   // where the packet ends, by its length field
}

// network checks an IPv4 or IPv6 header and returns the offset of the
// transport header, where the packet ends by its own length field (never
// beyond b), and the transport protocol. Every parser starts here, so that
// no rewrite reads or writes past what the packet says it holds.
func network(b []byte) (l4, end int, proto ipproto.Proto, err error) {
	if len(b) < 1 {
		return 0, 0, 0, ErrShort
	}
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 {
			return 0, 0, 0, ErrShort
		}
		l4 = int(b[0]&0x0f) * 4
		end = int(binary.BigEndian.Uint16(b[2:4]))
		if l4 < 20 || end < l4 || end > len(b) {
			return 0, 0, 0, ErrHeaderBytes
		}
		if binary.BigEndian.Uint16(b[6:8])&0x3fff != 0 { // MF or offset
			return 0, 0, 0, ErrFragment
		}
		return l4, end, ipproto.Proto(b[9]), nil
	case 6:
		if len(b) < 40 {
			return 0, 0, 0, ErrShort
		}
		end = 40 + int(binary.BigEndian.Uint16(b[4:6]))
		if end > len(b) {
			return 0, 0, 0, ErrHeaderBytes
		}
		return 40, end, ipproto.Proto(b[6]), nil // extension headers are not followed
	}
	return 0, 0, 0, ErrVersion
}

// Parse fills t from the IPv4 or IPv6 packet b: TCP, UDP, or an ICMP or
// ICMPv6 echo request or reply. Anything else is ErrProtocol.
func Parse(b []byte, t *Packet) error {
	l4, end, proto, err := network(b)
	if err != nil {
		return err
	}
	v6 := b[0]>>4 == 6
	switch {
	case proto == ipproto.TCP:
		if end < l4+20 {
			return ErrHeaderBytes
		}
		doff := int(b[l4+12]>>4) * 4
		if doff < 20 || end < l4+doff {
			return ErrHeaderBytes
		}
		t.Flags = b[l4+13]
	case proto == ipproto.UDP:
		if end < l4+8 {
			return ErrHeaderBytes
		}
		t.Flags = 0
	case proto == ipproto.ICMP && !v6, proto == ipproto.ICMPv6 && v6:
		if end < l4+8 {
			return ErrHeaderBytes
		}
		if !isEcho(proto, b[l4]) {
			return ErrProtocol
		}
		t.Flags = b[l4]
	default:
		return ErrProtocol
	}
	var src, dst netip.Addr
	if v6 {
		src, dst = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
	} else {
		src, dst = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
	}
	t.Proto, t.L4, t.end = proto, l4, end
	t.Src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(b[l4+portOffset(proto, true):]))
	t.Dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(b[l4+portOffset(proto, false):]))
	return nil
}

// isEcho reports whether an ICMP (proto 1) or ICMPv6 (58) type is an echo
// request or reply.
func isEcho(proto ipproto.Proto, typ uint8) bool {
	if proto == ipproto.ICMP {
		return typ == EchoRequest4 || typ == EchoReply4
	}
	return typ == EchoRequest6 || typ == EchoReply6
}

// portOffset is where a transport header holds the source (or destination)
// port; an ICMP echo's identifier is both.
func portOffset(proto ipproto.Proto, src bool) int {
	switch {
	case proto == ipproto.ICMP || proto == ipproto.ICMPv6:
		return 4
	case src:
		return 0
	}
	return 2
}

// checksumOffset is where a transport header holds its checksum.
func checksumOffset(proto ipproto.Proto) int {
	switch proto {
	case ipproto.TCP:
		return 16
	case ipproto.UDP:
		return 6
	}
	return 2 // ICMP, ICMPv6
}

// SetSource writes a new source address and port into a packet parsed into
// t. The address must be of the packet's family; for an ICMP echo the port
// is the identifier. Checksums are not touched: call Checksum after the last
// change.
func SetSource(b []byte, t *Packet, src netip.AddrPort) {
	a := src.Addr()
	if a.Is4() {
		a4 := a.As4()
		copy(b[12:16], a4[:])
	} else {
		a16 := a.As16()
		copy(b[8:24], a16[:])
	}
	binary.BigEndian.PutUint16(b[t.L4+portOffset(t.Proto, true):], src.Port())
	t.Src = src
}

// SetDestination writes a new destination address and port, the inverse
// of SetSource for replies. Checksums are not touched.
func SetDestination(b []byte, t *Packet, dst netip.AddrPort) {
	a := dst.Addr()
	if a.Is4() {
		a4 := a.As4()
		copy(b[16:20], a4[:])
	} else {
		a16 := a.As16()
		copy(b[24:40], a16[:])
	}
	binary.BigEndian.PutUint16(b[t.L4+portOffset(t.Proto, false):], dst.Port())
	t.Dst = dst
}

// ClampMSS lowers the MSS option of a TCP SYN to at most mss. It returns
// the option's previous value and whether it changed.
func ClampMSS(b []byte, t *Packet, mss uint16) (old uint16, changed bool) {
	if t.Proto != ipproto.TCP {
		return 0, false
	}
	doff := int(b[t.L4+12]>>4) * 4
	opts := b[t.L4+20 : t.L4+doff]
	for i := 0; i < len(opts); {
		switch kind := opts[i]; kind {
		case 0: // end of options
			return 0, false
		case 1: // no-op
			i++
			continue
		case 2: // MSS
			if i+4 > len(opts) || opts[i+1] != 4 {
				return 0, false
			}
			old = binary.BigEndian.Uint16(opts[i+2:])
			if old <= mss {
				return old, false
			}
			binary.BigEndian.PutUint16(opts[i+2:], mss)
			return old, true
		default:
			if i+1 >= len(opts) || opts[i+1] < 2 {
				return 0, false
			}
			i += int(opts[i+1])
		}
	}
	return 0, false
}

// Checksum recomputes the IPv4 header checksum (if any) and the complete
// transport checksum of a packet parsed into t: TCP, UDP (an IPv4 datagram
// sent without a checksum keeps none), ICMP, or ICMPv6 with its
// pseudo-header.
func Checksum(b []byte, t *Packet) {
	seg := b[t.L4:t.end]
	var pseudo uint64
	v4 := b[0]>>4 == 4
	if v4 {
		b[10], b[11] = 0, 0
		binary.BigEndian.PutUint16(b[10:], ^fold(sum(b[:t.L4], 0)))
		pseudo = sum(b[12:20], 0)
	} else {
		pseudo = sum(b[8:40], 0)
	}
	pseudo += uint64(t.Proto) + uint64(len(seg))
	if t.Proto == ipproto.ICMP {
		pseudo = 0 // ICMP's checksum covers the message alone
	}
	ck := checksumOffset(t.Proto)
	if t.Proto == ipproto.UDP && v4 && seg[ck] == 0 && seg[ck+1] == 0 {
		return // sent without a checksum
	}
	seg[ck], seg[ck+1] = 0, 0
	c := ^fold(sum(seg, pseudo))
	if c == 0 && t.Proto == ipproto.UDP {
		c = 0xffff // zero means "no checksum" in UDP
	}
	binary.BigEndian.PutUint16(seg[ck:], c)
}

// sum adds b as big-endian 16-bit words to acc (one's complement, unfolded).
func sum(b []byte, acc uint64) uint64 {
	for len(b) >= 8 {
		acc += uint64(binary.BigEndian.Uint32(b)) + uint64(binary.BigEndian.Uint32(b[4:]))
		b = b[8:]
	}
	for len(b) >= 2 {
		acc += uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint64(b[0]) << 8
	}
	return acc
}

func fold(acc uint64) uint16 {
	for acc>>16 != 0 {
		acc = acc&0xffff + acc>>16
	}
	return uint16(acc)
}
