// Package connect decides connections at connect(): a cgroup BPF program
// (bpf/connect.c) evaluates the policy's rules, as compiled here into BPF
// maps, and binds a socket a rule sends via an uplink to the uplink's
// address, with its mark. The socket then is on the uplink from its first
// packet: nothing is queued, translated or tracked.
//
// One decision model feeds both engines: Compile turns the same
// policy.KernelRule view the nftables prefilter uses into an Image, which
// the kernel evaluates from its maps and Image.Decide evaluates in Go, the
// same way. The tests hold the two against policy.Config.Decide.
package connect

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/policy"
)

// Limits of the kernel's tables (bpf/connect.c).
const (
	MaxRules      = 64
	MaxChoices    = 8
	MaxUplinks    = 16
	ChoiceDefault = 255
)

// Rule flags, as bpf/connect.c reads them.
const (
	fDst uint32 = 1 << iota
	fNotDst
	fDport
	fNotDport
	fUID
	fNotUID
	fGID
	fNotGID
	fCgroup
	fComm
	fStop
)

// Actions.
const (
	aUplink  = 0
	aDefault = 1
	aBalance = 2
)

// Image is a policy compiled for the kernel.
type Image struct {
	Rules   []Rule
	Uplinks []string // names, by index
	// HonorMarks: a socket that carries a mark when it connects (SO_MARK)
	// is left to the host's routing, as the queue's way honours a mark.
	HonorMarks bool
}

// Rule is one compiled rule.
type Rule struct {
	Name         string
	Flags        uint32
	Protos       uint8 // bit 0 tcp, bit 1 udp; 0 any
	Action       uint8
	Choices      []uint8 // uplink indexes, ChoiceDefault for "default"
	Weights      []uint32
	DropWhenDown bool
	// Why names the key that stops the kernel's evaluation at this rule
	// (fStop), for explanations.
	Why string

	Dst, NotDst       []netip.Prefix
	Dports, NotDports []policy.PortRange
	UIDs, NotUIDs     []uint32
	GIDs, NotGIDs     []uint32
	CgroupIDs         []uint64
	Comms             []string
}

// Compile turns cfg's rules into an Image. cgroupRoot is the cgroup v2
// mount: a cgroup key's paths are found there (a path that does not exist
// yet stops the kernel's evaluation at its rule: the queue's way decides).
// It fails only when the policy is too big for the kernel's tables; the
// caller then steers at the queue.
func Compile(cfg *policy.Config, cgroupRoot string) (*Image, error) {
	if len(cfg.Rules) > MaxRules {
		return nil, fmt.Errorf("%d rules: connect-time steering takes at most %d", len(cfg.Rules), MaxRules)
	}
	if len(cfg.Uplinks) > MaxUplinks {
		return nil, fmt.Errorf("%d uplinks: connect-time steering takes at most %d", len(cfg.Uplinks), MaxUplinks)
	}
	im := &Image{HonorMarks: cfg.Daemon.HonorMarks}
	index := map[*policy.Uplink]uint8{}
	for i, u := range cfg.Uplinks {
		index[u] = uint8(i)
		im.Uplinks = append(im.Uplinks, u.Name)
	}
	for i, k := range cfg.KernelRules() {
		pr := cfg.Rules[i]
		r := Rule{Name: k.Name}
		for _, p := range k.Protocols {
			switch p {
			case ipproto.TCP:
				r.Protos |= 1
			case ipproto.UDP:
				r.Protos |= 2
			}
		}
		if len(k.Protocols) > 0 && r.Protos == 0 {
			r.Protos = 4 // icmp only: never a connect() this program sees
		}
		if k.Dst.Set {
			r.Flags |= fDst
			r.Dst = k.Dst.Prefixes
		}
		if k.NotDst.Set {
			r.Flags |= fNotDst
			r.NotDst = k.NotDst.Prefixes
		}
		if k.Dports != nil {
			r.Flags |= fDport
			r.Dports = k.Dports
		}
		if k.NotDports != nil {
			r.Flags |= fNotDport
			r.NotDports = k.NotDports
		}
		for _, ids := range []struct {
			list []uint32
			flag uint32
			dst  *[]uint32
		}{{k.UIDs, fUID, &r.UIDs}, {k.NotUIDs, fNotUID, &r.NotUIDs}, {k.GIDs, fGID, &r.GIDs}, {k.NotGIDs, fNotGID, &r.NotGIDs}} {
			if ids.list != nil {
				r.Flags |= ids.flag
				*ids.dst = ids.list
			}
		}
		if len(k.Cgroups) > 0 {
			all := false
			for _, p := range k.Cgroups {
				if p == "" {
					all = true // the root: every cgroup
					break
				}
				var st syscall.Stat_t
				if err := syscall.Stat(filepath.Join(cgroupRoot, p), &st); err != nil {
					if !os.IsNotExist(err) {
						return nil, fmt.Errorf("rule %q: cgroup %s: %w", k.Name, p, err)
					}
					r.Flags |= fStop
					r.Why = fmt.Sprintf("cgroup %s does not exist (yet)", p)
					continue
				}
				r.CgroupIDs = append(r.CgroupIDs, st.Ino)
			}
			if !all {
				r.Flags |= fCgroup
			}
		}
		if len(k.Processes) > 0 {
			r.Flags |= fComm
			for _, n := range k.Processes {
				if len(n) <= 15 { // a longer name is never a comm (its exe's may match: the daemon's)
					r.Comms = append(r.Comms, n)
				}
			}
		}
		if k.Other {
			r.Flags |= fStop
			r.Why = "a key only the daemon can test (exe, not_process, not_cgroup)"
		}
		a := pr.Action
		switch a.Kind {
		case policy.ActDefault:
			r.Action = aDefault
		case policy.ActMark:
			r.Flags |= fStop
			r.Why = "a bare mark: routed by the daemon"
		case policy.ActBalance:
			r.Action = aBalance
		default:
			r.Action = aUplink
		}
		if len(a.Choices) > MaxChoices {
			return nil, fmt.Errorf("rule %q: %d uplinks: connect-time steering takes at most %d", k.Name, len(a.Choices), MaxChoices)
		}
		for j, c := range a.Choices {
			ch := uint8(ChoiceDefault)
			if c.Uplink != nil {
				ch = index[c.Uplink]
			}
			r.Choices = append(r.Choices, ch)
			if a.Kind == policy.ActBalance {
				r.Weights = append(r.Weights, uint32(a.Weights[j]))
			}
		}
		if a.Kind == policy.ActBalance && a.Sticky {
			r.Flags |= fStop
			r.Why = `balance with sticky = "destination": kept by the daemon`
		}
		r.DropWhenDown = a.DropWhenDown
		im.Rules = append(im.Rules, r)
	}
	return im, nil
}

// Conn is a connect() as the kernel program sees it.
type Conn struct {
	Proto    ipproto.Proto // TCP or UDP
	Dst      netip.AddrPort
	UID, GID uint32
	Cgroups  []uint64 // the caller's cgroup and its ancestors' ids
	Comm     string
}

// Up says whether an uplink (by index) is up in a family.
type Up func(uplink int, v6 bool) bool

// Verdict is what the kernel program does with a connect().
type Verdict struct {
	Rule   int    // index of the deciding rule; -1: none matched
	Uplink int    // the uplink the socket is bound to; -1: left alone
	Refuse bool   // connect() fails (on_down = "drop")
	Stop   bool   // left to the queue: the rule needs the daemon
	Why    string // for Stop
	// Balanced: the uplink was picked at random among Candidates.
	Balanced   bool
	Candidates []int
}

// Decide evaluates the image for c as bpf/connect.c does (a balance's
// random pick aside: Candidates lists what it picks from).
func (im *Image) Decide(c Conn, up Up) Verdict {
	v6 := c.Dst.Addr().Is6() && !c.Dst.Addr().Is4In6()
	dst := c.Dst.Addr().Unmap()
	bit := uint8(1)
	if c.Proto == ipproto.UDP {
		bit = 2
	}
	for i := range im.Rules {
		r := &im.Rules[i]
		f := r.Flags
		switch {
		case r.Protos != 0 && r.Protos&bit == 0:
		case f&fDst != 0 && !inPrefixes(r.Dst, dst):
		case f&fNotDst != 0 && inPrefixes(r.NotDst, dst):
		case f&fDport != 0 && !inPorts(r.Dports, c.Dst.Port()):
		case f&fNotDport != 0 && inPorts(r.NotDports, c.Dst.Port()):
		case f&fUID != 0 && !inIDs(r.UIDs, c.UID):
		case f&fNotUID != 0 && inIDs(r.NotUIDs, c.UID):
		case f&fGID != 0 && !inIDs(r.GIDs, c.GID):
		case f&fNotGID != 0 && inIDs(r.NotGIDs, c.GID):
		case f&fCgroup != 0 && !inCgroups(r.CgroupIDs, c.Cgroups):
		case f&fComm != 0 && !inStrings(r.Comms, c.Comm):
			return Verdict{Rule: i, Uplink: -1, Stop: true, Why: "process: comm " + c.Comm + " is not listed; its exe's name may be"}
		case f&fStop != 0:
			return Verdict{Rule: i, Uplink: -1, Stop: true, Why: r.Why}
		default:
			return r.decide(i, v6, up)
		}
	}
	return Verdict{Rule: -1, Uplink: -1}
}

func (r *Rule) decide(i int, v6 bool, up Up) Verdict {
	v := Verdict{Rule: i, Uplink: -1}
	switch r.Action {
	case aDefault:
		return v
	case aBalance:
		for j, ch := range r.Choices {
			if ch != ChoiceDefault && r.Weights[j] > 0 && up(int(ch), v6) {
				v.Candidates = append(v.Candidates, int(ch))
			}
		}
		if len(v.Candidates) > 0 {
			v.Balanced, v.Uplink = true, v.Candidates[0]
			return v
		}
	default:
		for _, ch := range r.Choices {
			if ch == ChoiceDefault {
				return v
			}
			if up(int(ch), v6) {
				v.Uplink = int(ch)
				return v
			}
		}
	}
	v.Refuse = r.DropWhenDown
	return v
}

func inPrefixes(ps []netip.Prefix, a netip.Addr) bool {
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func inPorts(rs []policy.PortRange, p uint16) bool {
	for _, r := range rs {
		if p >= r.Lo && p <= r.Hi {
			return true
		}
	}
	return false
}

func inIDs(ids []uint32, id uint32) bool {
	for _, x := range ids {
		if x == id {
			return true
		}
	}
	return false
}

func inCgroups(want, have []uint64) bool {
	for _, h := range have {
		for _, w := range want {
			if h == w {
				return true
			}
		}
	}
	return false
}

func inStrings(ss []string, s string) bool {
	for _, x := range ss {
		if x == s {
			return true
		}
	}
	return false
}
