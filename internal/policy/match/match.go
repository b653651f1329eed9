// Package match is what a rule tests on a new flow: the flow as the
// policy sees it, and one condition per key of a [[rule]] (dst, dport,
// protocol, uid, gid, process, exe, cgroup), each able to say why it does
// not hold.
package match

import (
	"fmt"
	"net/netip"
	"os/user"
	"path"
	"slices"
	"strconv"
	"strings"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy/prefixset"
)

// PortRange is an inclusive range of ports; a single port has Lo == Hi.
type PortRange struct{ Lo, Hi uint16 }

func (r PortRange) String() string {
	if r.Lo == r.Hi {
		return strconv.Itoa(int(r.Lo))
	}
	return fmt.Sprintf("%d-%d", r.Lo, r.Hi)
}

// Flow describes a new connection as the policy sees it. Owner is consulted
// only when a rule's cheaper keys all match and it has a process or cgroup
// key.
type Flow struct {
	Proto    ipproto.Proto // TCP, UDP, or ICMP or ICMPv6 (an echo): the policy's "icmp" is both
	Dst      netip.AddrPort
	UID, GID uint32
	HasUID   bool  // false for packets without an owning socket
	Owner    Owner // nil: no process and no cgroup known
}

// Owner resolves, lazily, who owns a flow's socket.
type Owner interface {
	// Process returns the owning process; false when there is none (a
	// kernel-generated packet, a socket already closed, a socket whose
	// process exited).
	Process() (owner.Process, bool)
	// Cgroup returns the socket's cgroup v2 path relative to the cgroup
	// mount, without leading or trailing slashes ("" is the root).
	Cgroup() (string, bool)
}

// Condition costs: conditions are evaluated cheapest first, so that a
// process is only looked up for a rule whose other keys all match.
const (
	CostCheap   = iota // packet and socket fields
	CostProcess        // a /proc lookup
	CostCgroup         // a cgroup id to path lookup
)

// Cond is one key of a rule, possibly negated (not_KEY).
type Cond struct {
	Key  string // as written, e.g. "not_dst"
	Neg  bool
	Cost int
	List string // the values as written (a long dst list cut short), for explanations
	// In, when set, replaces List when the flow's value is in it: a long
	// list names the entry that holds the value instead.
	In func(f *Flow) string
	// Test answers for the positive key; ok=false when the flow lacks
	// what the key needs (no socket, no process): then the condition
	// fails whether negated or not.
	Test func(f *Flow) (match, ok bool)
	// Value describes the flow's value for this key, for explanations.
	Value func(f *Flow) string
	// KV is the key's values, typed, for the kernel's prefilter:
	// []ipproto.Proto protocols, *prefixset.Set, []PortRange, []uint32
	// ids, or []string process names and cgroups.
	KV any
}

// Holds reports whether the condition holds for f.
func (c *Cond) Holds(f *Flow) bool {
	m, ok := c.Test(f)
	return ok && m != c.Neg
}

// Why says why the condition does not hold for f.
func (c *Cond) Why(f *Flow) string {
	m, ok := c.Test(f)
	switch {
	case !ok:
		return fmt.Sprintf("%s: the connection has no %s", c.Key, c.Value(f))
	case c.Neg && m:
		list := c.List
		if c.In != nil {
			list = c.In(f)
		}
		return fmt.Sprintf("%s: %s is in %s", c.Key, c.Value(f), list)
	default:
		return fmt.Sprintf("%s: %s is not in %s", c.Key, c.Value(f), c.List)
	}
}

// --- condition constructors, one per key ---

// Protocol matches the protocols as the configuration names them (see
// ParseProtocol): ipproto.ICMP is an echo of either family.
func Protocol(ps []ipproto.Proto) Cond {
	return Cond{Key: "protocol", KV: ps, List: listOf(ps), Value: func(f *Flow) string { return protocol(f.Proto).String() },
		Test: func(f *Flow) (bool, bool) { return slices.Contains(ps, protocol(f.Proto)), true }}
}

// ParseProtocol parses a protocol as the configuration names it: "tcp",
// "udp", or "icmp" for an ICMP or ICMPv6 echo (ipproto.ICMP).
func ParseProtocol(s string) (ipproto.Proto, bool) {
	switch s {
	case "tcp":
		return ipproto.TCP, true
	case "udp":
		return ipproto.UDP, true
	case "icmp":
		return ipproto.ICMP, true
	}
	return 0, false
}

// protocol is p as the configuration names it: ICMPv6 is "icmp" too.
func protocol(p ipproto.Proto) ipproto.Proto {
	if p == ipproto.ICMPv6 {
		return ipproto.ICMP
	}
	return p
}

func Dst(s *prefixset.Set) Cond {
	return Cond{Key: "dst", KV: s, List: s.String(), Value: func(f *Flow) string { return f.Dst.Addr().String() },
		In:   func(f *Flow) string { return s.In(f.Dst.Addr().Unmap()) },
		Test: func(f *Flow) (bool, bool) { return s.Contains(f.Dst.Addr().Unmap()), true }}
}

func Dport(rs []PortRange) Cond {
	return Cond{Key: "dport", KV: rs, List: listOf(rs), Value: func(f *Flow) string {
		if f.Proto.IsICMP() {
			return "no port (icmp)"
		}
		return strconv.Itoa(int(f.Dst.Port()))
	},
		Test: func(f *Flow) (bool, bool) {
			if f.Proto.IsICMP() {
				return false, true // an echo's identifier is not a port
			}
			p := f.Dst.Port()
			for _, r := range rs {
				if p >= r.Lo && p <= r.Hi {
					return true, true
				}
			}
			return false, true
		}}
}

func UID(key string, us []uint32) Cond {
	return Cond{Key: key, KV: us, List: listOf(us), Value: func(f *Flow) string {
		if !f.HasUID {
			return "owning socket"
		}
		return IDName("uid", f.UID)
	}, Test: func(f *Flow) (bool, bool) { return slices.Contains(us, f.UID), f.HasUID }}
}

func GID(key string, gs []uint32) Cond {
	return Cond{Key: key, KV: gs, List: listOf(gs), Value: func(f *Flow) string {
		if !f.HasUID {
			return "owning socket"
		}
		return IDName("gid", f.GID)
	}, Test: func(f *Flow) (bool, bool) { return slices.Contains(gs, f.GID), f.HasUID }}
}

// IDName words a uid ("uid") or gid ("gid") for a person: its number, and
// the user's or group's name where the host has one ("uid 1000 (alice)").
func IDName(kind string, id uint32) string {
	s := kind + " " + strconv.FormatUint(uint64(id), 10)
	var name string
	if kind == "gid" {
		if g, err := lookupGroupID(s[4:]); err == nil {
			name = g.Name
		}
	} else if u, err := lookupUserID(s[4:]); err == nil {
		name = u.Username
	}
	if name == "" {
		return s
	}
	return s + " (" + name + ")"
}

// The user database, as IDName reads it; tests replace it.
var (
	lookupUserID  = user.LookupId
	lookupGroupID = user.LookupGroupId
)

// Process matches the process's comm or the base name of its exe.
func Process(names []string) Cond {
	return Cond{Key: "process", Cost: CostProcess, KV: names, List: listOf(names),
		Value: func(f *Flow) string {
			p, ok := process(f)
			if !ok {
				return "owning process"
			}
			return fmt.Sprintf("process %q (exe %s, pid %d)", p.Comm, p.Exe, p.PID)
		},
		Test: func(f *Flow) (bool, bool) {
			p, ok := process(f)
			if !ok {
				return false, false
			}
			base := path.Base(p.Exe)
			for _, n := range names {
				if n == p.Comm || n == base {
					return true, true
				}
			}
			return false, true
		}}
}

func Exe(paths []string) Cond {
	return Cond{Key: "exe", Cost: CostProcess, List: listOf(paths),
		Value: func(f *Flow) string {
			p, ok := process(f)
			if !ok {
				return "owning process"
			}
			return "exe " + p.Exe
		},
		Test: func(f *Flow) (bool, bool) {
			p, ok := process(f)
			if !ok {
				return false, false
			}
			return slices.Contains(paths, p.Exe), true
		}}
}

// Cgroup matches a cgroup path or any cgroup below it, whole
// components only: "system.slice" matches "system.slice/x.service" but not
// "system.slice2".
func Cgroup(prefixes []string) Cond {
	return Cond{Key: "cgroup", Cost: CostCgroup, KV: prefixes, List: listOf(prefixes),
		Value: func(f *Flow) string {
			cg, ok := cgroup(f)
			if !ok {
				return "known cgroup"
			}
			return fmt.Sprintf("cgroup %q", cg)
		},
		Test: func(f *Flow) (bool, bool) {
			cg, ok := cgroup(f)
			if !ok {
				return false, false
			}
			for _, p := range prefixes {
				if p == "" || cg == p || strings.HasPrefix(cg, p+"/") {
					return true, true
				}
			}
			return false, true
		}}
}

func process(f *Flow) (owner.Process, bool) {
	if f.Owner == nil {
		return owner.Process{}, false
	}
	return f.Owner.Process()
}

func cgroup(f *Flow) (string, bool) {
	if f.Owner == nil {
		return "", false
	}
	return f.Owner.Cgroup()
}

func listOf[T any](xs []T) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = fmt.Sprint(x)
	}
	return "[" + strings.Join(s, ", ") + "]"
}
