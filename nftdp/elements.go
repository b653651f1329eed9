package nftdp

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// The per-flow transaction is built by hand on a socket of its own: one
// write carries the whole batch and one read collects the answer, where the
// general-purpose library takes nine syscalls and a few dozen allocations
// per transaction (measured: ~28 µs against ~12 µs, more under load).
// Everything else (installing, listing, removing the table) goes through
// google/nftables.

// nfnetlink and nf_tables message constants (linux/netfilter/nfnetlink.h,
// nf_tables.h).
const (
	nfnlBatchBegin   = 0x10
	nfnlBatchEnd     = 0x11
	nfnlSubsysNFT    = 10
	nftMsgNewSetElem = 12
	nftMsgDelSetElem = 14
	attrElemTable    = 1 // NFTA_SET_ELEM_LIST_TABLE
	attrElemSet      = 2 // NFTA_SET_ELEM_LIST_SET
	attrElemElements = 3 // NFTA_SET_ELEM_LIST_ELEMENTS
	attrListElem     = 1 // NFTA_LIST_ELEM
	attrElemKey      = 1 // NFTA_SET_ELEM_KEY
	attrElemData     = 2 // NFTA_SET_ELEM_DATA
	attrDataValue    = 1 // NFTA_DATA_VALUE
	nlaNested        = 0x8000
)

// elemConn is the socket for flow transactions and its buffers.
type elemConn struct {
	fd      int
	seq     uint32
	out, in string // the sets' names
	maps    bool   // the sets are maps: elements carry data
	wbuf    []byte
	rbuf    []byte
}

func openElemConn(out, in string, maps bool) (*elemConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("nftables socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("nftables socket: %w", err)
	}
	return &elemConn{fd: fd, out: out, in: in, maps: maps, wbuf: make([]byte, 0, 64<<10), rbuf: make([]byte, 64<<10)}, nil
}

func (c *elemConn) close() error { return unix.Close(c.fd) }

// transact sends changes to the outbound and inbound sets as one batch and
// waits for its outcome: all applied, or none.
func (c *elemConn) transact(changes []Op) error {
	b := c.wbuf[:0]
	b = c.header(b, nfnlBatchBegin, unix.NLM_F_REQUEST, unix.AF_UNSPEC, nfnlSubsysNFT)
	var last uint32
	for i := 0; i < len(changes); {
		j := i
		for j < len(changes) && changes[j].Delete == changes[i].Delete {
			j++
		}
		run := changes[i:j]
		del := run[0].Delete
		typ := uint16(nftMsgNewSetElem)
		flags := uint16(unix.NLM_F_REQUEST | unix.NLM_F_CREATE)
		if del {
			typ, flags = nftMsgDelSetElem, unix.NLM_F_REQUEST
		}
		for _, set := range [2]string{c.out, c.in} {
			ack := uint16(0)
			if j == len(changes) && set == c.in {
				ack = unix.NLM_F_ACK // the batch's last message
			}
			start := len(b)
			b = c.header(b, nfnlSubsysNFT<<8|typ, flags|ack, unix.NFPROTO_INET, 0)
			last = c.seq
			b = strAttr(b, attrElemTable, TableName)
			b = strAttr(b, attrElemSet, set)
			list := len(b)
			b = append(b, 0, 0, 0, 0)
			for _, ch := range run {
				e := len(b)
				b = append(b, 0, 0, 0, 0)
				var key, val [16]byte
				var kl, vl int
				if set == c.out {
					kl = putTuple(key[:], ch.Src, ch.Dst)
					vl = putAddrPort(val[:], ch.NewSrc)
					binary.NativeEndian.PutUint32(val[8:], ch.Mark)
					vl += 4
				} else {
					kl = putTuple(key[:], ch.NewSrc, ch.Dst)
					vl = putAddrPort(val[:], ch.Src)
				}
				b = dataAttr(b, attrElemKey, key[:kl])
				if !del && c.maps {
					b = dataAttr(b, attrElemData, val[:vl])
				}
				closeAttr(b, e, attrListElem|nlaNested)
			}
			closeAttr(b, list, attrElemElements|nlaNested)
			binary.NativeEndian.PutUint32(b[start:], uint32(len(b)-start))
		}
		i = j
	}
	b = c.header(b, nfnlBatchEnd, unix.NLM_F_REQUEST, unix.AF_UNSPEC, nfnlSubsysNFT)
	c.wbuf = b
	if _, err := unix.Write(c.fd, b); err != nil {
		return fmt.Errorf("nftables batch: %w", err)
	}
	// The kernel processes the batch while we write: the answers are
	// waiting. Read until the last message's acknowledgement.
	var failed error
	for {
		n, err := unix.Read(c.fd, c.rbuf)
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return fmt.Errorf("nftables batch reply: %w", err)
		}
		for r := c.rbuf[:n]; len(r) >= 16; {
			l := int(binary.NativeEndian.Uint32(r))
			if l < 16 || l > len(r) {
				return errors.New("nftables batch reply: malformed")
			}
			if binary.NativeEndian.Uint16(r[4:]) == unix.NLMSG_ERROR && l >= 20 {
				seq := binary.NativeEndian.Uint32(r[8:])
				if code := int32(binary.NativeEndian.Uint32(r[16:])); code != 0 && failed == nil {
					failed = unix.Errno(-code)
				}
				if seq == last {
					return failed
				}
			}
			r = r[min((l+3)&^3, len(r)):]
		}
	}
}

// header appends a netlink and an nfgenmsg header; the length is filled in
// for fixed-size messages and patched by the caller for others.
func (c *elemConn) header(b []byte, typ, flags uint16, family uint8, resID uint16) []byte {
	c.seq++
	b = binary.NativeEndian.AppendUint32(b, 20)
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = binary.NativeEndian.AppendUint16(b, flags)
	b = binary.NativeEndian.AppendUint32(b, c.seq)
	b = binary.NativeEndian.AppendUint32(b, 0)
	b = append(b, family, 0)
	return binary.BigEndian.AppendUint16(b, resID)
}

func strAttr(b []byte, typ uint16, s string) []byte {
	l := 4 + len(s) + 1
	b = binary.NativeEndian.AppendUint16(b, uint16(l))
	b = binary.NativeEndian.AppendUint16(b, typ)
	b = append(b, s...)
	b = append(b, 0)
	return pad(b)
}

// dataAttr appends a nested attribute holding one NFTA_DATA_VALUE.
func dataAttr(b []byte, typ uint16, v []byte) []byte {
	b = binary.NativeEndian.AppendUint16(b, uint16(8+len(v)))
	b = binary.NativeEndian.AppendUint16(b, typ|nlaNested)
	b = binary.NativeEndian.AppendUint16(b, uint16(4+len(v)))
	b = binary.NativeEndian.AppendUint16(b, attrDataValue)
	b = append(b, v...)
	return pad(b)
}

// closeAttr writes the header of an attribute opened at start.
func closeAttr(b []byte, start int, typ uint16) {
	binary.NativeEndian.PutUint16(b[start:], uint16(len(b)-start))
	binary.NativeEndian.PutUint16(b[start+2:], typ)
}

func pad(b []byte) []byte {
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// putTuple writes a . b as a concatenated key (address, port padded to a
// 32-bit register) and returns its length.
func putTuple(dst []byte, a, b netip.AddrPort) int {
	n := putAddrPort(dst, a)
	return n + putAddrPort(dst[n:], b)
}

func putAddrPort(dst []byte, ap netip.AddrPort) int {
	a := ap.Addr().As4()
	copy(dst, a[:])
	binary.BigEndian.PutUint16(dst[4:], ap.Port())
	dst[6], dst[7] = 0, 0
	return 8
}
