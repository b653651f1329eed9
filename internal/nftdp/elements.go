package nftdp

import (
	"encoding/binary"
	"net/netip"

	"github.com/google/nftables"
	"github.com/rerouted/rerouted/internal/nftdp/nftbatch"
)

// A flow's elements: which of its protocol's sets and maps a change writes,
// with what keys and data. The per-flow transaction is built by hand, as
// are the translation rules and the maps of marks: nftbatch says why, and
// writes the messages. Everything else (installing, listing, removing the
// table) goes through google/nftables.

// flowBatch is the batch of changes to the protocols' outbound and inbound
// sets (or pass sets), all applied or none, with the sequence number of its
// last message, the one acknowledged (for nftbatch.Conn.Send).
func flowBatch(w *nftbatch.Writer, changes []Op, setsOf func(*Entry) *proto) (b []byte, last uint32) {
	w.Begin()
	for i := 0; i < len(changes); {
		p := setsOf(&changes[i].Entry)
		del, pass := changes[i].Delete, changes[i].Pass
		j := i
		for j < len(changes) && changes[j].Delete == del && changes[j].Pass == pass && setsOf(&changes[j].Entry) == p {
			j++
		}
		// The sets to write, by role: outbound keys are the socket's
		// tuple, inbound ones the reply's view of the wire tuple.
		sets := p.flowSets()
		if pass {
			sets = [7]*nftables.Set{5: p.pass}
		} else {
			sets[5] = nil
		}
		lastSet := len(sets) - 1
		for lastSet > 0 && sets[lastSet] == nil {
			lastSet--
		}
		for k, set := range sets {
			if set == nil {
				continue
			}
			w.Elements(set.Name, del, j == len(changes) && k == lastSet) // the batch's last message is acknowledged
			for _, ch := range changes[i:j] {
				var key [40]byte
				var val [16]byte
				var kl, vl int
				switch {
				case k < 3 || k == 5: // outbound and pass: the socket's tuple
					kl = putTuple(key[:], ch.Src, ch.Dst)
				case k == 6: // the wire: mark . port . destination
					binary.NativeEndian.PutUint32(key[:], ch.Mark)
					binary.BigEndian.PutUint16(key[4:], ch.NewSrc.Port())
					key[6], key[7] = 0, 0
					kl = 8 + putAddrPort(key[8:], ch.Dst)
				default:
					kl = putTuple(key[:], ch.NewSrc, ch.Dst)
				}
				switch k {
				case 0: // out: the new source address
					vl = putAddr(val[:], ch.NewSrc.Addr())
				case 1: // outPort
					vl = 2
					binary.BigEndian.PutUint16(val[:], ch.NewSrc.Port())
				case 2: // outMark
					vl = 4
					binary.NativeEndian.PutUint32(val[:], ch.Mark)
				case 3: // in: the socket's address
					vl = putAddr(val[:], ch.Src.Addr())
				case 4: // inPort
					vl = 2
					binary.BigEndian.PutUint16(val[:], ch.Src.Port())
				}
				var data []byte
				if !del && set.IsMap {
					data = val[:vl]
				}
				w.Element(key[:kl], data)
			}
			w.EndElements()
		}
		i = j
	}
	return w.End()
}

// putTuple writes a . b as a concatenated key (address, port padded to a
// 32-bit register) and returns its length.
func putTuple(dst []byte, a, b netip.AddrPort) int {
	n := putAddrPort(dst, a)
	return n + putAddrPort(dst[n:], b)
}

// putAddr writes an address and returns its length.
func putAddr(dst []byte, a netip.Addr) int {
	if a.Is4() {
		a4 := a.As4()
		return copy(dst, a4[:])
	}
	a16 := a.As16()
	return copy(dst, a16[:])
}

func putAddrPort(dst []byte, ap netip.AddrPort) int {
	n := 4
	if a := ap.Addr(); a.Is4() {
		a4 := a.As4()
		copy(dst, a4[:])
	} else {
		a16 := a.As16()
		n = copy(dst, a16[:])
	}
	binary.BigEndian.PutUint16(dst[n:], ap.Port())
	dst[n+2], dst[n+3] = 0, 0
	return n + 4
}
