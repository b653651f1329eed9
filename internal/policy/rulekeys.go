package policy

import (
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/policy/match"
	"github.com/rerouted/rerouted/internal/policy/prefixset"
)

// ruleDraft is a [[rule]] as its keys are decoded: the rule, and the ids
// of user/uid and group/gid, which are one key each (written by name or
// number), made conditions once every key is read.
type ruleDraft struct {
	r   *Rule
	ids map[string][]uint32
}

// ruleKey decodes one [[rule]] key. decode is given the key as written
// (k, with its not_ if any), its path (kp) and its value. A condition
// key returns its condition and true (the caller names it and negates
// it); an action or setting key fills the draft and returns false.
type ruleKey struct {
	decode    func(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool)
	negatable bool // takes a not_ form (negatableList)
}

// ruleKeys are the [[rule]] keys, each with its decoder.
var ruleKeys = map[string]ruleKey{
	"name":       {decode: ruleName},
	"uplink":     {decode: ruleUplink},
	"balance":    {decode: ruleBalance},
	"sticky":     {decode: ruleSticky},
	"sticky_for": {decode: ruleStickyFor},
	"on_down":    {decode: ruleOnDown},
	"mark":       {decode: ruleMark},
	"dst":        {decode: ruleDst, negatable: true},
	"dport":      {decode: ruleDport, negatable: true},
	"uid":        {decode: ruleID, negatable: true},
	"gid":        {decode: ruleID, negatable: true},
	"user":       {decode: ruleIDByName, negatable: true},
	"group":      {decode: ruleIDByName, negatable: true},
	"protocol":   {decode: ruleProtocol},
	"process":    {decode: ruleProcess, negatable: true},
	"exe":        {decode: ruleExe, negatable: true},
	"cgroup":     {decode: ruleCgroup, negatable: true},
}

func ruleName(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	d.r.Name = p.name(kp, v)
	return match.Cond{}, false
}

// ruleUplink: a name, or a list of names in order of preference.
func ruleUplink(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	r := d.r
	var names []string
	switch v := v.(type) {
	case string:
		names = []string{v}
	case []any:
		names = p.strings(kp, v)
		if len(names) == 0 {
			p.errorf(kp, "uplink must name at least one [[uplink]], or \"default\"")
			return match.Cond{}, false
		}
	default:
		p.errorf(kp, "uplink must be the name of an [[uplink]], \"default\", or a list of them")
		return match.Cond{}, false
	}
	bad := false
	for i, n := range names {
		if n == "" {
			p.errorf(kp, "uplink must be the name of an [[uplink]], or \"default\"")
			bad = true
		}
		for _, m := range names[:i] {
			if m == n {
				p.errorf(kp, "uplink %q is listed twice", n)
				bad = true
			}
		}
	}
	if bad {
		return match.Cond{}, false
	}
	if names[0] == "default" {
		r.Action = Action{Kind: ActDefault, UplinkName: "default"}
		if len(names) > 1 {
			p.errorf(kp, "\"default\" is always up: the uplinks after it would never be chosen")
		}
		return match.Cond{}, false
	}
	r.Action = Action{Kind: ActUplink, UplinkName: names[0]}
	for _, n := range names {
		r.Action.Choices = append(r.Action.Choices, Choice{Name: n})
	}
	return match.Cond{}, false
}

func ruleBalance(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	r := d.r
	t, ok := v.(map[string]any)
	if !ok || len(t) == 0 {
		p.errorf(kp, "balance must be a table of uplinks and weights, like { \"isp-a\" = 3, \"isp-b\" = 1 }")
		return match.Cond{}, false
	}
	r.Action = Action{Kind: ActBalance}
	for _, n := range sortedKeys(t) {
		w, ok := p.integer(kp+"."+n, t[n], 1, 1000000)
		if !ok {
			continue
		}
		r.Action.Choices = append(r.Action.Choices, Choice{Name: n})
		r.Action.Weights = append(r.Action.Weights, int(w))
	}
	if len(r.Action.Choices) > 0 {
		r.Action.UplinkName = r.Action.Choices[0].Name
	}
	return match.Cond{}, false
}

func ruleSticky(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	if v != "destination" {
		p.errorf(kp, "sticky must be \"destination\": a user's flows to one destination keep one uplink")
		return match.Cond{}, false
	}
	d.r.sticky = true
	return match.Cond{}, false
}

func ruleStickyFor(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	str, _ := v.(string)
	dur, err := time.ParseDuration(str)
	if err != nil || dur < time.Second || dur > 24*time.Hour {
		p.errorf(kp, "sticky_for must be a duration between 1s and 24h, like \"10m\"")
		return match.Cond{}, false
	}
	d.r.stickyFor = dur
	return match.Cond{}, false
}

func ruleOnDown(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	switch v {
	case "default":
	case "drop":
		d.r.dropWhenDown = true
	default:
		p.errorf(kp, "on_down must be \"default\" (the host's routing) or \"drop\"")
	}
	return match.Cond{}, false
}

func ruleMark(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	if n, ok := p.integer(kp, v, 1, 0xffffffff); ok {
		d.r.Action = Action{Kind: ActMark, Mark: uint32(n)}
	}
	return match.Cond{}, false
}

// ruleDst goes straight into the trie: no second copy of a long list.
func ruleDst(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	set := &prefixset.Set{}
	for _, s := range p.strings(kp, v) {
		pfx, err := netip.ParsePrefix(s)
		if err != nil {
			a, aerr := netip.ParseAddr(s)
			if aerr != nil {
				p.errorf(kp, "bad CIDR %q in %s", s, k)
				continue
			}
			pfx = netip.PrefixFrom(a, a.BitLen())
		}
		if pfx != pfx.Masked() {
			p.errorf(kp, "%s %q has host bits set (did you mean %s?)", k, s, pfx.Masked())
			continue
		}
		set.Add(pfx)
	}
	return match.Dst(set), true
}

func ruleDport(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	return match.Dport(p.ports(kp, v)), true
}

// ruleID is uid or gid by number; the condition is made after every key
// (rule), with those written by name.
func ruleID(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	for _, x := range list(v) {
		if n, ok := p.integer(kp, x, 0, 0xfffffffe); ok {
			d.ids[k] = append(d.ids[k], uint32(n))
		}
	}
	return match.Cond{}, false
}

// ruleIDByName is user or group: uid or gid by name.
func ruleIDByName(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	base := strings.TrimPrefix(k, "not_")
	for _, s := range p.strings(kp, v) {
		id, err := lookupID(base, s)
		if err != nil {
			p.errorf(kp, "%v", err)
			continue
		}
		idKey := idKeys[k]
		d.ids[idKey] = append(d.ids[idKey], id)
	}
	return match.Cond{}, false
}

func ruleProtocol(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	ss := p.strings(kp, v)
	ps := make([]ipproto.Proto, 0, len(ss)) // never nil: protocol = [] matches nothing
	for _, s := range ss {
		pr, ok := ParseProtocol(s)
		if !ok {
			p.errorf(kp, "protocol %q is not supported (supported: \"tcp\", \"udp\", \"icmp\" for ICMP and ICMPv6 echo)", s)
			continue
		}
		ps = append(ps, pr)
	}
	return match.Protocol(ps), true
}

func ruleProcess(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	names := p.strings(kp, v)
	for _, n := range names {
		if n == "" || strings.Contains(n, "/") {
			p.errorf(kp, "process %q must be a program name (comm or the exe's base name); use exe for paths", n)
		}
	}
	return match.Process(names), true
}

func ruleExe(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	paths := p.strings(kp, v)
	for _, e := range paths {
		if !strings.HasPrefix(e, "/") {
			p.errorf(kp, "exe %q must be an absolute path", e)
		}
	}
	return match.Exe(paths), true
}

func ruleCgroup(p *parser, d *ruleDraft, k, kp string, v any) (match.Cond, bool) {
	var cgs []string
	for _, cg := range p.strings(kp, v) {
		clean := strings.Trim(cg, "/")
		if strings.Contains(clean, "//") || strings.Contains("/"+clean+"/", "/../") || strings.Contains("/"+clean+"/", "/./") {
			p.errorf(kp, "cgroup %q is not a clean path", cg)
			continue
		}
		cgs = append(cgs, clean)
	}
	return match.Cgroup(cgs), true
}

// ruleKeyNames lists every key a [[rule]] accepts: ruleKeys', and the not_
// form of each negatable one.
func ruleKeyNames() []string {
	var ks []string
	for k, key := range ruleKeys {
		ks = append(ks, k)
		if key.negatable {
			ks = append(ks, "not_"+k)
		}
	}
	slices.Sort(ks)
	return ks
}
