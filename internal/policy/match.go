package policy

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/policy/match"
)

// Rule is one [[rule]]: conditions that must all hold, and an action.
type Rule struct {
	Name   string
	Action Action
	conds  []match.Cond // cheap ones first: see cost
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

// Match reports whether every condition of the rule holds for f.
func (r *Rule) Match(f *Flow) bool {
	for i := range r.conds {
		if !r.conds[i].Holds(f) {
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
		if !c.Holds(f) {
			return c.Why(f)
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

// Flow, Owner and PortRange are the match package's: what a rule tests,
// and how the configuration writes ports.
type (
	Flow      = match.Flow
	Owner     = match.Owner
	PortRange = match.PortRange
)

// ParseProtocol parses a protocol as the configuration names it (see
// match.ParseProtocol).
func ParseProtocol(s string) (ipproto.Proto, bool) { return match.ParseProtocol(s) }

// IDName words a uid or gid for a person (see match.IDName).
func IDName(kind string, id uint32) string { return match.IDName(kind, id) }
