package prefixset

import "net/netip"

// KernelAddrs is an address list as ranges, per family.
type KernelAddrs struct {
	Set      bool           // the key is given
	Prefixes []netip.Prefix // the list as prefixes, both families
	Ranges   [2][]AddrRange // [0] IPv4, [1] IPv6, sorted, disjoint, not adjacent
	Big      [2]bool        // too many ranges for a kernel set: counts as "may match"
}

// AddrRange is an inclusive range of addresses.
type AddrRange struct{ First, Last netip.Addr }

// MaxKernelRanges bounds the ranges of one list the prefilter puts in a
// kernel set; a longer list is left to the daemon (its trie costs the same
// whatever its length).
const MaxKernelRanges = 20000

// KernelAddrs turns the list into disjoint ranges per family. IPv4
// prefixes written as IPv4-mapped IPv6 stay IPv6, as they match (nothing
// unmapped).
func (s *Set) KernelAddrs() KernelAddrs {
	k := KernelAddrs{Set: true}
	for fi, all := range [2]func(yield func(netip.Prefix) bool){s.trie.AllSorted4(), s.trie.AllSorted6()} {
		var rs []AddrRange
		for p := range all {
			k.Prefixes = append(k.Prefixes, p)
			if k.Big[fi] {
				continue // the prefixes go on: the connect-time engine takes any number
			}
			first := p.Masked().Addr()
			last := lastAddr(p)
			if n := len(rs); n > 0 {
				prev := &rs[n-1]
				// Sorted by first address: a prefix that starts within
				// or right after the previous range joins it.
				if next := prev.Last.Next(); !next.IsValid() || !next.Less(first) {
					if prev.Last.Less(last) {
						prev.Last = last
					}
					continue
				}
			}
			rs = append(rs, AddrRange{first, last})
			if len(rs) > MaxKernelRanges {
				k.Big[fi] = true
				rs = nil
			}
		}
		k.Ranges[fi] = rs
	}
	return k
}

// lastAddr is the last address of a prefix.
func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}
