package policy

import (
	"slices"
	"strings"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/policy/prefixset"
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
	Dst, NotDst prefixset.KernelAddrs
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

// KernelRules returns, in order, what the kernel can test of each rule.
func (c *Config) KernelRules() []KernelRule {
	out := make([]KernelRule, 0, len(c.Rules))
	for _, r := range c.Rules {
		k := KernelRule{Name: r.Name, Queue: r.Action.Kind != ActDefault, Exact: true}
		for _, cd := range r.conds {
			base := strings.TrimPrefix(cd.Key, "not_")
			switch base {
			case "protocol":
				k.Protocols = cd.KV.([]ipproto.Proto)
			case "dst":
				a := cd.KV.(*prefixset.Set).KernelAddrs()
				if cd.Neg {
					k.NotDst = a
				} else {
					k.Dst = a
				}
				if a.Big[0] || a.Big[1] {
					k.Exact = false
				}
			case "dport":
				// Merged: a kernel interval set refuses overlaps.
				if cd.Neg {
					k.NotDports = mergePorts(cd.KV.([]PortRange))
				} else {
					k.Dports = mergePorts(cd.KV.([]PortRange))
				}
			case "uid", "user":
				if cd.Neg {
					k.NotUIDs = cd.KV.([]uint32)
				} else {
					k.UIDs = cd.KV.([]uint32)
				}
			case "gid", "group":
				if cd.Neg {
					k.NotGIDs = cd.KV.([]uint32)
				} else {
					k.GIDs = cd.KV.([]uint32)
				}
			case "process":
				k.Exact = false
				if cd.Neg {
					k.Other = true
				} else {
					k.Processes = cd.KV.([]string)
				}
			case "cgroup":
				k.Exact = false
				if cd.Neg {
					k.Other = true
				} else {
					k.Cgroups = cd.KV.([]string)
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

// Prefiltered says whether the kernel's prefilter sends a new flow like f
// to the daemon, and why, as the prefilter judges it: by the keys it tests
// (a process, exe or cgroup key may match). A mark the host's own rules
// set on the packet sends it to the daemon too, with honor_marks.
func (c *Config) Prefiltered(f *Flow) (queued bool, why string) {
	for _, r := range c.Rules {
		matched, exact := true, true
		for _, cd := range r.conds {
			switch strings.TrimPrefix(cd.Key, "not_") {
			case "process", "exe", "cgroup":
				exact = false
				continue
			}
			m, ok := cd.Test(f)
			if !ok || m == cd.Neg {
				matched = false
				break
			}
		}
		switch {
		case !matched:
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
