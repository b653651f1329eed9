// Package nlmsg encodes and decodes netlink messages in place, in the
// caller's buffers, and owns the sockets that carry them (conn.go): the
// pieces that queue, sockdiag and nftdp each wrote for themselves.
//
// Encoding appends to a slice and decoding slices the input: nothing
// allocates once a buffer has the room. Integers in netlink headers and
// attribute headers are in host byte order (binary.NativeEndian, which
// mdlayher/netlink's nlenc now defers to); nfnetlink's payloads are big
// endian, hence AppendBE32.
package nlmsg

import (
	"encoding/binary"
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// Sizes and flags (linux/netlink.h).
const (
	HeaderLen     = unix.NLMSG_HDRLEN // struct nlmsghdr
	AttrHeaderLen = unix.NLA_HDRLEN   // struct nlattr
	NfgenLen      = 4                 // struct nfgenmsg, after the header of an nfnetlink message
	Nested        = unix.NLA_F_NESTED // an attribute that holds attributes
	TypeMask      = 0x3fff            // NLA_TYPE_MASK: an attribute's type without its flags
)

// Align rounds n up to netlink's 4-byte alignment (NLMSG_ALIGN, NLA_ALIGN).
func Align(n int) int { return (n + 3) &^ 3 }

// Header is a netlink message header (struct nlmsghdr).
type Header struct {
	Len    uint32 // the whole message, header included, padding excluded
	Type   uint16
	Flags  uint16
	Seq    uint32
	PortID uint32
}

// PutHeader writes h into b[:HeaderLen].
func PutHeader(b []byte, h Header) {
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], h.Len)
	ne.PutUint16(b[4:], h.Type)
	ne.PutUint16(b[6:], h.Flags)
	ne.PutUint32(b[8:], h.Seq)
	ne.PutUint32(b[12:], h.PortID)
}

// AppendHeader appends a message header from port 0 (the kernel fills in
// the sender) whose length counts the header alone: End sets it once the
// message is complete.
func AppendHeader(b []byte, typ, flags uint16, seq uint32) []byte {
	ne := binary.NativeEndian
	b = ne.AppendUint32(b, HeaderLen)
	b = ne.AppendUint16(b, typ)
	b = ne.AppendUint16(b, flags)
	b = ne.AppendUint32(b, seq)
	return ne.AppendUint32(b, 0)
}

// AppendNfgen appends an nfnetlink message's struct nfgenmsg: the family,
// version 0, and the resource id (a queue number, a batch's subsystem) in
// network byte order.
func AppendNfgen(b []byte, family uint8, resID uint16) []byte {
	b = append(b, family, unix.NFNETLINK_V0)
	return binary.BigEndian.AppendUint16(b, resID)
}

// PutNfgen writes a struct nfgenmsg into b[:NfgenLen].
func PutNfgen(b []byte, family uint8, resID uint16) {
	b[0], b[1] = family, unix.NFNETLINK_V0
	binary.BigEndian.PutUint16(b[2:], resID)
}

// End sets the length of the message that starts at start in b to the end
// of b.
func End(b []byte, start int) {
	binary.NativeEndian.PutUint32(b[start:], uint32(len(b)-start))
}

// PutAttrHeader writes an attribute header into b[:AttrHeaderLen]: length
// counts the header and the value, without padding.
func PutAttrHeader(b []byte, length int, typ uint16) {
	binary.NativeEndian.PutUint16(b, uint16(length))
	binary.NativeEndian.PutUint16(b[2:], typ)
}

// AppendAttr appends an attribute holding v, padded.
func AppendAttr(b []byte, typ uint16, v []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(AttrHeaderLen+len(v)))
	b = binary.NativeEndian.AppendUint16(b, typ)
	return Pad(append(b, v...))
}

// AppendString appends an attribute holding s and its terminating NUL
// (NLA_NUL_STRING, as nfnetlink's names are), padded.
func AppendString(b []byte, typ uint16, s string) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(AttrHeaderLen+len(s)+1))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, s...)
	return Pad(append(b, 0))
}

// AppendBE32 appends an attribute holding v in network byte order
// (nfnetlink's integers).
func AppendBE32(b []byte, typ uint16, v uint32) []byte {
	b = binary.NativeEndian.AppendUint16(b, AttrHeaderLen+4)
	b = binary.NativeEndian.AppendUint16(b, typ)
	return binary.BigEndian.AppendUint32(b, v)
}

// OpenAttr appends room for the header of an attribute whose value is
// appended next: note len(b) before, and CloseAttr writes the header there.
func OpenAttr(b []byte) []byte {
	return append(b, 0, 0, 0, 0)
}

// CloseAttr writes the header of the attribute opened at start: its value
// runs to the end of b.
func CloseAttr(b []byte, start int, typ uint16) {
	PutAttrHeader(b[start:], len(b)-start, typ)
}

// Pad appends zeros up to the next alignment.
func Pad(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// ErrMalformed: a message or an attribute whose length does not fit.
var ErrMalformed = errors.New("malformed netlink message")

// Split returns the first message of b, which must hold at least HeaderLen
// bytes: its header, its payload, and what follows its padding. It returns
// ErrMalformed when the header's length is shorter than the header or
// longer than b.
func Split(b []byte) (h Header, payload, rest []byte, err error) {
	ne := binary.NativeEndian
	h = Header{Len: ne.Uint32(b), Type: ne.Uint16(b[4:]), Flags: ne.Uint16(b[6:]), Seq: ne.Uint32(b[8:]), PortID: ne.Uint32(b[12:])}
	l := int(h.Len)
	if l < HeaderLen || l > len(b) {
		return h, nil, nil, ErrMalformed
	}
	return h, b[HeaderLen:l], b[min(Align(l), len(b)):], nil
}

// SplitAttr returns the first attribute of b: its type (flags included:
// mask with TypeMask), its value, and what follows its padding. ok is false
// when b holds no complete attribute.
func SplitAttr(b []byte) (typ uint16, v, rest []byte, ok bool) {
	if len(b) < AttrHeaderLen {
		return 0, nil, nil, false
	}
	l := int(binary.NativeEndian.Uint16(b))
	if l < AttrHeaderLen || l > len(b) {
		return 0, nil, nil, false
	}
	return binary.NativeEndian.Uint16(b[2:]), b[AttrHeaderLen:l], b[min(Align(l), len(b)):], true
}

// Error returns what an NLMSG_ERROR message's payload reports: nil for an
// acknowledgement, else the kernel's errno (a unix.Errno, which errors.Is
// and == compare). A payload too short to hold the code is ErrMalformed.
func Error(payload []byte) error {
	if len(payload) < 4 {
		return fmt.Errorf("NLMSG_ERROR of %d bytes: %w", len(payload), ErrMalformed)
	}
	if code := int32(binary.NativeEndian.Uint32(payload)); code != 0 {
		return unix.Errno(-code)
	}
	return nil
}
