package policy

import "net/netip"

// Rule is one [[rule]]. All keys it sets must match; a list matches when any
// element does. An unset key matches everything.
type Rule struct {
	Name       string
	UplinkName string
	Uplink     *Uplink
	Dst        []netip.Prefix
	DPort      []PortRange
	UID        []uint32 // from uid and user
	Protocol   string   // "" matches every protocol
	line       int
}

// Line is where the rule's [[rule]] header is written.
func (r *Rule) Line() int { return r.line }

// PortRange is an inclusive range of ports; a single port has Lo == Hi.
type PortRange struct{ Lo, Hi uint16 }

// Flow describes a new connection as far as the policy can see it.
type Flow struct {
	Protocol string // "tcp"
	Dst      netip.AddrPort
	UID      uint32
	HasUID   bool // false for packets without an owning socket
}

// Match reports whether every key of the rule matches f.
func (r *Rule) Match(f *Flow) bool {
	if r.Protocol != "" && r.Protocol != f.Protocol {
		return false
	}
	if len(r.Dst) > 0 && !containsAddr(r.Dst, f.Dst.Addr()) {
		return false
	}
	if len(r.DPort) > 0 && !containsPort(r.DPort, f.Dst.Port()) {
		return false
	}
	if len(r.UID) > 0 && (!f.HasUID || !containsUID(r.UID, f.UID)) {
		return false
	}
	return true
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

// UplinkByMark returns the uplink that uses mark, or nil.
func (c *Config) UplinkByMark(mark uint32) *Uplink {
	for _, u := range c.Uplinks {
		if u.Mark == mark {
			return u
		}
	}
	return nil
}

func containsAddr(ps []netip.Prefix, a netip.Addr) bool {
	a = a.Unmap()
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func containsPort(rs []PortRange, p uint16) bool {
	for _, r := range rs {
		if p >= r.Lo && p <= r.Hi {
			return true
		}
	}
	return false
}

func containsUID(us []uint32, u uint32) bool {
	for _, x := range us {
		if x == u {
			return true
		}
	}
	return false
}
