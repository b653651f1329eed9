package policy

import (
	"fmt"
	"net/netip"
	"os/user"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy/prefixset"
)

// Rule is one [[rule]]: conditions that must all hold, and an action.
type Rule struct {
	Name   string
	Action Action
	conds  []cond // cheap ones first: see cost
	line   int

	dropWhenDown bool          // on_down = "drop", as parsed
	sticky       bool          // sticky = "destination", as parsed
	stickyFor    time.Duration // as parsed
}

// Line is where the rule's [[rule]] header is written.
func (r *Rule) Line() int { return r.line }

// ActionKind says what a matching rule does.
type ActionKind int

const (
	// ActUplink sends the flow out an uplink: Action.Uplink.
	ActUplink ActionKind = iota
	// ActDefault pins the flow to the host's normal routing: no translation.
	ActDefault
	// ActMark routes the flow with a bare fwmark: Action.Mark.
	ActMark
	// ActBalance spreads new flows over Choices by Weights; each keeps
	// the uplink it got for life.
	ActBalance
)

// Action is what a matching rule does.
type Action struct {
	Kind       ActionKind
	Uplink     *Uplink // ActUplink: the first choice
	UplinkName string  // as written (the first choice)
	Mark       uint32  // ActUplink (the first choice's) and ActMark
	// Choices, for ActUplink: the uplinks in order of preference; the
	// first that is up takes the flow. A nil Uplink is "default", the
	// host's own routing, which is always up.
	Choices []Choice
	// DropWhenDown: when none of the choices is up, the flow is refused
	// (on_down = "drop") rather than left to the host's routing.
	DropWhenDown bool
	// Weights, for ActBalance: one per choice, > 0.
	Weights []int
	// Sticky, for ActBalance: a user's new flows to one destination take
	// the uplink its last one took, for StickyFor after that one.
	Sticky    bool
	StickyFor time.Duration
}

// Choice is one uplink of a rule's list, or "default" (Uplink nil).
type Choice struct {
	Name   string
	Uplink *Uplink
}

func (a Action) String() string {
	switch a.Kind {
	case ActDefault:
		return `uplink "default" (no translation)`
	case ActMark:
		return fmt.Sprintf("mark %d", a.Mark)
	case ActBalance:
		parts := make([]string, len(a.Choices))
		for i, c := range a.Choices {
			parts[i] = fmt.Sprintf("%q = %d", c.Name, a.Weights[i])
		}
		s := "balance { " + strings.Join(parts, ", ") + " }"
		if a.Sticky {
			s += fmt.Sprintf(", sticky by destination for %s", a.StickyFor)
		}
		return s
	}
	if len(a.Choices) > 1 {
		names := make([]string, len(a.Choices))
		for i, c := range a.Choices {
			names[i] = strconv.Quote(c.Name)
		}
		return "the first up of uplink [" + strings.Join(names, ", ") + "]"
	}
	return fmt.Sprintf("uplink %q (mark %d)", a.UplinkName, a.Mark)
}

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

// Match reports whether every condition of the rule holds for f.
func (r *Rule) Match(f *Flow) bool {
	for i := range r.conds {
		if !r.conds[i].holds(f) {
			return false
		}
	}
	return true
}

// Explain is Match with the reason: the first condition that does not hold,
// or "" when the rule matches.
func (r *Rule) Explain(f *Flow) string {
	for i := range r.conds {
		c := &r.conds[i]
		if !c.holds(f) {
			return c.why(f)
		}
	}
	return ""
}

// Decide returns the first rule that matches f, or nil.
func (c *Config) Decide(f *Flow) *Rule {
	for _, r := range c.Rules {
		if r.Match(f) {
			return r
		}
	}
	return nil
}

// UplinkByName returns the uplink named name, or nil.
func (c *Config) UplinkByName(name string) *Uplink {
	for _, u := range c.Uplinks {
		if u.Name == name {
			return u
		}
	}
	return nil
}

// UplinkByMark returns the uplink that uses mark, or nil.
func (c *Config) UplinkByMark(mark uint32) *Uplink {
	for _, u := range c.Uplinks {
		if u.Mark == mark {
			return u
		}
	}
	return nil
}

// Condition costs: conditions are evaluated cheapest first, so that a
// process is only looked up for a rule whose other keys all match.
const (
	costCheap   = iota // packet and socket fields
	costProcess        // a /proc lookup
	costCgroup         // a cgroup id to path lookup
)

// cond is one key of a rule, possibly negated (not_KEY).
type cond struct {
	key  string // as written, e.g. "not_dst"
	neg  bool
	cost int
	list string // the values as written (a long dst list cut short), for explanations
	// in, when set, replaces list when the flow's value is in it: a long
	// list names the entry that holds the value instead.
	in func(f *Flow) string
	// test answers for the positive key; ok=false when the flow lacks
	// what the key needs (no socket, no process): then the condition
	// fails whether negated or not.
	test func(f *Flow) (match, ok bool)
	// value describes the flow's value for this key, for explanations.
	value func(f *Flow) string
	// kv is the key's values, typed, for the kernel's prefilter
	// (KernelRule): []ipproto.Proto protocols, *prefixset.Set, []PortRange or
	// []uint32 ids.
	kv any
}

func (c *cond) holds(f *Flow) bool {
	m, ok := c.test(f)
	return ok && m != c.neg
}

func (c *cond) why(f *Flow) string {
	m, ok := c.test(f)
	switch {
	case !ok:
		return fmt.Sprintf("%s: the connection has no %s", c.key, c.value(f))
	case c.neg && m:
		list := c.list
		if c.in != nil {
			list = c.in(f)
		}
		return fmt.Sprintf("%s: %s is in %s", c.key, c.value(f), list)
	default:
		return fmt.Sprintf("%s: %s is not in %s", c.key, c.value(f), c.list)
	}
}

// --- condition constructors, one per key ---

// condProtocol matches the protocols as the configuration names them (see
// ParseProtocol): ipproto.ICMP is an echo of either family.
func condProtocol(ps []ipproto.Proto) cond {
	return cond{key: "protocol", kv: ps, list: listOf(ps), value: func(f *Flow) string { return protocol(f.Proto).String() },
		test: func(f *Flow) (bool, bool) { return slices.Contains(ps, protocol(f.Proto)), true }}
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

func condDst(s *prefixset.Set) cond {
	return cond{key: "dst", kv: s, list: s.String(), value: func(f *Flow) string { return f.Dst.Addr().String() },
		in:   func(f *Flow) string { return s.In(f.Dst.Addr().Unmap()) },
		test: func(f *Flow) (bool, bool) { return s.Contains(f.Dst.Addr().Unmap()), true }}
}

func condDport(rs []PortRange) cond {
	return cond{key: "dport", kv: rs, list: listOf(rs), value: func(f *Flow) string {
		if f.Proto.IsICMP() {
			return "no port (icmp)"
		}
		return strconv.Itoa(int(f.Dst.Port()))
	},
		test: func(f *Flow) (bool, bool) {
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

func condUID(key string, us []uint32) cond {
	return cond{key: key, kv: us, list: listOf(us), value: func(f *Flow) string {
		if !f.HasUID {
			return "owning socket"
		}
		return IDName("uid", f.UID)
	}, test: func(f *Flow) (bool, bool) { return containsU32(us, f.UID), f.HasUID }}
}

func condGID(key string, gs []uint32) cond {
	return cond{key: key, kv: gs, list: listOf(gs), value: func(f *Flow) string {
		if !f.HasUID {
			return "owning socket"
		}
		return IDName("gid", f.GID)
	}, test: func(f *Flow) (bool, bool) { return containsU32(gs, f.GID), f.HasUID }}
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

// condProcess matches the process's comm or the base name of its exe.
func condProcess(names []string) cond {
	return cond{key: "process", cost: costProcess, kv: names, list: listOf(names),
		value: func(f *Flow) string {
			p, ok := process(f)
			if !ok {
				return "owning process"
			}
			return fmt.Sprintf("process %q (exe %s, pid %d)", p.Comm, p.Exe, p.PID)
		},
		test: func(f *Flow) (bool, bool) {
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

func condExe(paths []string) cond {
	return cond{key: "exe", cost: costProcess, list: listOf(paths),
		value: func(f *Flow) string {
			p, ok := process(f)
			if !ok {
				return "owning process"
			}
			return "exe " + p.Exe
		},
		test: func(f *Flow) (bool, bool) {
			p, ok := process(f)
			if !ok {
				return false, false
			}
			return containsStr(paths, p.Exe), true
		}}
}

// condCgroup matches a cgroup path or any cgroup below it, whole
// components only: "system.slice" matches "system.slice/x.service" but not
// "system.slice2".
func condCgroup(prefixes []string) cond {
	return cond{key: "cgroup", cost: costCgroup, kv: prefixes, list: listOf(prefixes),
		value: func(f *Flow) string {
			cg, ok := cgroup(f)
			if !ok {
				return "known cgroup"
			}
			return fmt.Sprintf("cgroup %q", cg)
		},
		test: func(f *Flow) (bool, bool) {
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

func containsStr(xs []string, s string) bool {
	for _, x := range xs {
		if x == s {
			return true
		}
	}
	return false
}

func containsU32(xs []uint32, v uint32) bool {
	for _, x := range xs {
		if x == v {
			return true
		}
	}
	return false
}
