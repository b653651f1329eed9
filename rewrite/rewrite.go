// Package rewrite parses and rewrites IP packets in place: source address and
// port, the TCP MSS option, and complete checksums.
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
)

// Parse errors. They are values so that the packet path does not allocate.
var (
	ErrShort       = errors.New("packet too short")
	ErrVersion     = errors.New("not an IPv4 or IPv6 packet")
	ErrNotTCP      = errors.New("not a TCP packet")
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

// TCP is a parsed view of an IP packet carrying a TCP segment.
type TCP struct {
	Src, Dst netip.AddrPort
	L4       int   // offset of the TCP header
	Flags    uint8 // TCP flags byte
}

// network checks an IPv4 or IPv6 header and returns the offset of the
// transport header, where the packet ends by its own length field (never
// beyond b), and the transport protocol. Every parser starts here, so that
// no rewrite reads or writes past what the packet says it holds.
func network(b []byte) (l4, end int, proto byte, err error) {
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
		return l4, end, b[9], nil
	case 6:
		if len(b) < 40 {
			return 0, 0, 0, ErrShort
		}
		end = 40 + int(binary.BigEndian.Uint16(b[4:6]))
		if end > len(b) {
			return 0, 0, 0, ErrHeaderBytes
		}
		return 40, end, b[6], nil // extension headers are not followed
	}
	return 0, 0, 0, ErrVersion
}

// ParseTCP fills t from the IPv4 or IPv6 packet b.
func ParseTCP(b []byte, t *TCP) error {
	l4, end, proto, err := network(b)
	if err != nil {
		return err
	}
	if proto != 6 {
		return ErrNotTCP
	}
	if end < l4+20 {
		return ErrHeaderBytes
	}
	doff := int(b[l4+12]>>4) * 4
	if doff < 20 || end < l4+doff {
		return ErrHeaderBytes
	}
	var src, dst netip.Addr
	if b[0]>>4 == 6 {
		src, dst = netip.AddrFrom16([16]byte(b[8:24])), netip.AddrFrom16([16]byte(b[24:40]))
	} else {
		src, dst = netip.AddrFrom4([4]byte(b[12:16])), netip.AddrFrom4([4]byte(b[16:20]))
	}
	t.Src = netip.AddrPortFrom(src, binary.BigEndian.Uint16(b[l4:]))
	t.Dst = netip.AddrPortFrom(dst, binary.BigEndian.Uint16(b[l4+2:]))
	t.L4 = l4
	t.Flags = b[l4+13]
	return nil
}

// SetSource writes a new source address and port into a TCP packet parsed
// into t. The address must be of the packet's family. Checksums are not
// touched: call Checksum after the last change.
func SetSource(b []byte, t *TCP, src netip.AddrPort) {
	a := src.Addr()
	if a.Is4() {
		a4 := a.As4()
		copy(b[12:16], a4[:])
	} else {
		a16 := a.As16()
		copy(b[8:24], a16[:])
	}
	binary.BigEndian.PutUint16(b[t.L4:], src.Port())
	t.Src = src
}

// SetDestination writes a new destination address and port, the inverse
// of SetSource for replies. Checksums are not touched.
func SetDestination(b []byte, t *TCP, dst netip.AddrPort) {
	a := dst.Addr()
	if a.Is4() {
		a4 := a.As4()
		copy(b[16:20], a4[:])
	} else {
		a16 := a.As16()
		copy(b[24:40], a16[:])
	}
	binary.BigEndian.PutUint16(b[t.L4+2:], dst.Port())
	t.Dst = dst
}

// ClampMSS lowers the MSS option of a SYN to at most mss. It returns the
// option's previous value and whether it changed.
func ClampMSS(b []byte, t *TCP, mss uint16) (old uint16, changed bool) {
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

// Checksum recomputes the IPv4 header checksum (if any) and the complete TCP
// checksum of a packet parsed into t.
func Checksum(b []byte, t *TCP) {
	var pseudo uint64
	var segLen int
	if b[0]>>4 == 4 {
		ihl := t.L4
		b[10], b[11] = 0, 0
		binary.BigEndian.PutUint16(b[10:], ^fold(sum(b[:ihl], 0)))
		total := int(binary.BigEndian.Uint16(b[2:4]))
		segLen = total - ihl
		pseudo = sum(b[12:20], 0) + 6 + uint64(segLen)
	} else {
		segLen = int(binary.BigEndian.Uint16(b[4:6]))
		pseudo = sum(b[8:40], 0) + 6 + uint64(segLen)
	}
	seg := b[t.L4 : t.L4+segLen]
	seg[16], seg[17] = 0, 0
	binary.BigEndian.PutUint16(seg[16:], ^fold(sum(seg, pseudo)))
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
