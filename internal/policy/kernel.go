package policy

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// The kernel prefilter: traffic the policy does not concern should never
// reach the daemon. The output chain tests, before queueing a new flow's
// first packet, what nftables can test there: the protocol, the
// destination address and port, and the socket's uid and gid. A rule's
// other keys (process, exe, cgroup) count as "may match": the daemon
// decides. KernelRules describes each rule that way.

// KernelRule is what of a rule the kernel can test.
type KernelRule struct {
	Name string
	// Queue: the rule sends flows somewhere other than the host's routing
	// (an uplink, a balance, a mark): a flow it may match goes to the
	// daemon. Otherwise it is uplink = "default": a flow it surely
	// matches (Exact) needs no decision, and neither do the rules after.
	Queue bool
	// Exact: every key of the rule is one the kernel tests.
	Exact bool
	// Protocols the rule can match: TCP, UDP, ICMP (an echo of either
	// family: ICMP stands for ICMPv6 too); nil for all.
	Protocols []ipproto.Proto
	// Dst and NotDst, per family ([0] IPv4, [1] IPv6): the ranges the
	// destination must (not) be in.
	Dst, NotDst KernelAddrs
	// Dports and NotDports: port ranges; nil for no condition.
	Dports, NotDports []PortRange
	// UIDs, NotUIDs, GIDs, NotGIDs: the socket's owner; nil for none.
	UIDs, NotUIDs, GIDs, NotGIDs []uint32
	// The keys the prefilter cannot test, for the connect-time engine
	// (which can test some): Processes and Cgroups as written; Other
	// says the rule has a key neither can test (exe, or a negated
	// process or cgroup key).
	Processes, Cgroups []string
	Other              bool
}

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

// KernelRules returns, in order, what the kernel can test of each rule.
func (c *Config) KernelRules() []KernelRule {
	out := make([]KernelRule, 0, len(c.Rules))
	for _, r := range c.Rules {
		k := KernelRule{Name: r.Name, Queue: r.Action.Kind != ActDefault, Exact: true}
		for _, cd := range r.conds {
			base := strings.TrimPrefix(cd.key, "not_")
			switch base {
			case "protocol":
				k.Protocols = cd.kv.([]ipproto.Proto)
			case "dst":
				a := kernelAddrs(cd.kv.(*prefixSet))
				if cd.neg {
					k.NotDst = a
				} else {
					k.Dst = a
				}
				if a.Big[0] || a.Big[1] {
					k.Exact = false
				}
			case "dport":
				// Merged: a kernel interval set refuses overlaps.
				if cd.neg {
					k.NotDports = mergePorts(cd.kv.([]PortRange))
				} else {
					k.Dports = mergePorts(cd.kv.([]PortRange))
				}
			case "uid", "user":
				if cd.neg {
					k.NotUIDs = cd.kv.([]uint32)
				} else {
					k.UIDs = cd.kv.([]uint32)
				}
			case "gid", "group":
				if cd.neg {
					k.NotGIDs = cd.kv.([]uint32)
				} else {
					k.GIDs = cd.kv.([]uint32)
				}
			case "process":
				k.Exact = false
				if cd.neg {
					k.Other = true
				} else {
					k.Processes = cd.kv.([]string)
				}
			case "cgroup":
				k.Exact = false
				if cd.neg {
					k.Other = true
				} else {
					k.Cgroups = cd.kv.([]string)
				}
			default: // exe: the daemon's to test
				k.Exact = false
				k.Other = true
			}
		}
		out = append(out, k)
	}
	return out
}

// kernelAddrs turns a prefix list into disjoint ranges per family. IPv4
// prefixes written as IPv4-mapped IPv6 stay IPv6, as they match (nothing
// unmapped).
func kernelAddrs(s *prefixSet) KernelAddrs {
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

// Prefiltered says whether the kernel's prefilter sends a new flow like f
// to the daemon, and why, as the prefilter judges it: by the keys it tests
// (a process, exe or cgroup key may match). A mark the host's own rules
// set on the packet sends it to the daemon too, with honor_marks.
func (c *Config) Prefiltered(f *Flow) (queued bool, why string) {
	for _, r := range c.Rules {
		match, exact := true, true
		for _, cd := range r.conds {
			switch strings.TrimPrefix(cd.key, "not_") {
			case "process", "exe", "cgroup":
				exact = false
				continue
			}
			m, ok := cd.test(f)
			if !ok || m == cd.neg {
				match = false
				break
			}
		}
		switch {
		case !match:
		case r.Action.Kind != ActDefault:
			if exact {
				return true, "rule " + strconvQuote(r.Name) + " matches it in the kernel"
			}
			return true, "rule " + strconvQuote(r.Name) + " may match it (its process, exe or cgroup key is the daemon's to test)"
		case exact:
			return false, "rule " + strconvQuote(r.Name) + " (uplink = \"default\") exempts it in the kernel"
		}
	}
	return false, "no rule can match it: the kernel lets it through without asking the daemon"
}

func strconvQuote(s string) string { return `"` + strings.ReplaceAll(s, `"`, `\"`) + `"` }

// mergePorts sorts port ranges and merges those that overlap or touch.
func mergePorts(rs []PortRange) []PortRange {
	s := slices.Clone(rs)
	slices.SortFunc(s, func(a, b PortRange) int { return int(a.Lo) - int(b.Lo) })
	var out []PortRange
	for _, r := range s {
		if n := len(out); n > 0 && int(r.Lo) <= int(out[n-1].Hi)+1 {
			out[n-1].Hi = max(out[n-1].Hi, r.Hi)
			continue
		}
		out = append(out, r)
	}
	return out
}
