// Package prefixset is a rule's dst list: a prefix trie, so that a lookup
// costs the same with 500,000 prefixes as with 5, and the same list as the
// disjoint address ranges the kernel's sets hold (KernelAddrs).
package prefixset

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/gaissmai/bart"
)

// explainHead is how many entries of a long dst list explanations print.
const explainHead = 8

// Set is a dst list held as a prefix trie, so that a lookup costs the
// same with 500,000 prefixes as with 5 (a scan cost ~2 ms per decision).
// The list as written is not kept: only its length and first entries, which
// is all explanations print of it.
type Set struct {
	trie bart.Lite // IPv4 and IPv6 apart: a mapped ::ffff:a.b.c.d/n stays IPv6
	n    int       // entries as written, duplicates included
	head []netip.Prefix
}

// Add adds p to the set.
func (s *Set) Add(p netip.Prefix) {
	s.trie.Insert(p)
	if s.n < explainHead {
		s.head = append(s.head, p)
	}
	s.n++
}

// Contains reports whether a (unmapped by the caller) is in a prefix of
// the set.
func (s *Set) Contains(a netip.Addr) bool {
	// netip.Prefix.Contains never matches an address with a zone, and the
	// linear match used it; bart ignores zones.
	return a.Zone() == "" && s.trie.Contains(a)
}

// String is the list for explanations: whole while short, else its first
// entries and how many more there are.
func (s *Set) String() string {
	l := listOf(s.head)
	if s.n <= explainHead {
		return l
	}
	return fmt.Sprintf("%s, … and %d more]", l[:len(l)-1], s.n-explainHead)
}

// In is the list for explaining why a is in it: whole while short, else
// the longest prefix that holds a.
func (s *Set) In(a netip.Addr) string {
	if s.n <= explainHead {
		return s.String()
	}
	lpm, ok := s.trie.LookupPrefixLPM(netip.PrefixFrom(a, a.BitLen()))
	if !ok {
		return s.String()
	}
	return fmt.Sprintf("%s (one of %d entries)", lpm, s.n)
}

// listOf is the list as policy's explanations print lists.
func listOf(xs []netip.Prefix) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = fmt.Sprint(x)
	}
	return "[" + strings.Join(s, ", ") + "]"
}
