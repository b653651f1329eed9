package policy

import (
	"fmt"
	"net/netip"

	"github.com/gaissmai/bart"
)

// explainHead is how many entries of a long dst list explanations print.
const explainHead = 8

// prefixSet is a dst list held as a prefix trie, so that a lookup costs the
// same with 500,000 prefixes as with 5 (a scan cost ~2 ms per decision).
// The list as written is not kept: only its length and first entries, which
// is all explanations print of it.
type prefixSet struct {
	trie bart.Lite // IPv4 and IPv6 apart: a mapped ::ffff:a.b.c.d/n stays IPv6
	n    int       // entries as written, duplicates included
	head []netip.Prefix
}

func (s *prefixSet) add(p netip.Prefix) {
	s.trie.Insert(p)
	if s.n < explainHead {
		s.head = append(s.head, p)
	}
	s.n++
}

// contains reports whether a (unmapped by the caller) is in a prefix of
// the set.
func (s *prefixSet) contains(a netip.Addr) bool {
	// netip.Prefix.Contains never matches an address with a zone, and the
	// linear match used it; bart ignores zones.
	return a.Zone() == "" && s.trie.Contains(a)
}

// String is the list for explanations: whole while short, else its first
// entries and how many more there are.
func (s *prefixSet) String() string {
	l := listOf(s.head)
	if s.n <= explainHead {
		return l
	}
	return fmt.Sprintf("%s, … and %d more]", l[:len(l)-1], s.n-explainHead)
}

// in is the list for explaining why a is in it: whole while short, else
// the longest prefix that holds a.
func (s *prefixSet) in(a netip.Addr) string {
	if s.n <= explainHead {
		return s.String()
	}
	lpm, ok := s.trie.LookupPrefixLPM(netip.PrefixFrom(a, a.BitLen()))
	if !ok {
		return s.String()
	}
	return fmt.Sprintf("%s (one of %d entries)", lpm, s.n)
}
