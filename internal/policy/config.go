// Package policy reads rerouted's TOML configuration and decides, for a new
// locally originated flow, which uplink (fwmark) it must leave through.
//
// Every error names the place in the file it comes from, as FILE:LINE:COL, so
// that `rerouted check` can be wired into editors and CI.
package policy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/user"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/rerouted/rerouted/internal/policy/match"
	"github.com/rerouted/rerouted/internal/policy/tomlpos"
)

// Config is a validated configuration.
type Config struct {
	File    string
	Daemon  Daemon
	Uplinks []*Uplink
	Rules   []*Rule
	Usage   Usage
}

// Usage holds the [usage] table: accounting of each owner's traffic on
// each uplink.
type Usage struct {
	Enabled  bool
	State    string        // the state file: the totals of ended sockets
	Interval time.Duration // how often the kernel's counts are read
	Top      int           // owners per uplink and kind named on /metrics; the rest are "other"
}

// DefaultUsageState is the state file's path where [usage] state is not
// set: in systemd's StateDirectory= when the unit gives one, else
// /var/lib/rerouted.
func DefaultUsageState() string {
	if d := os.Getenv("STATE_DIRECTORY"); d != "" {
		if i := strings.IndexByte(d, ':'); i >= 0 { // several directories: the first
			d = d[:i]
		}
		return filepath.Join(d, "usage.json")
	}
	return "/var/lib/rerouted/usage.json"
}

// Daemon holds the [daemon] table.
type Daemon struct {
	Queue         uint16        // NFQUEUE number
	HonorMarks    bool          // a mark set by the host's own rules decides the uplink
	ControlSocket string        // unix socket for `rerouted flows`
	GCInterval    time.Duration // how often sockets are checked for flows to remove
	Datapath      string        // "kernel" (nft maps) or "userspace" (every packet through the daemon)
	Queues        int           // NFQUEUE queues from Queue on (Queue..Queue+Queues-1), one worker each, on either datapath
	IdleTimeout   time.Duration // UDP and ICMP echo flows end after this long without a packet
	MetricsListen string        // host:port for Prometheus metrics; "" for none
	// FailClosed (on_failure = "closed"): traffic the policy concerns is
	// dropped, never sent untranslated, when it cannot be decided: no
	// daemon, a full queue, a failed lookup.
	FailClosed bool
	// Steering: "connect" (the default) decides the rules it can at
	// connect(), in a cgroup BPF program that binds the socket to its
	// uplink's address, where the kernel supports it; "queue" decides
	// each new flow at its first packet, in the daemon.
	Steering string
	// SteeringSet: steering was written in the file, not defaulted. An
	// explicit "connect" is a requirement (doctor calls its fallback to
	// the queue a problem); the default is a preference.
	SteeringSet bool
	// NewFlowsPerUID: each user's budget of new connections a second,
	// and as many new UDP and echo flows, that go to the daemon's queues
	// (twice that at once); past it that user's new flows go to the
	// overflow queue. 0: no budget.
	NewFlowsPerUID int
	// HostMarks: "kernel" (the default) has the kernel decide flows the
	// host's own rules marked for an uplink that is up, where it can;
	// "queue" sends them to the daemon, as every other new flow.
	HostMarks string
}

// Uplink is one [[uplink]]: a fwmark whose routing table leads out of it.
// With Table and a gateway it is managed: rerouted installs the table's
// default route and the ip rules that lead to it, and removes them on exit.
type Uplink struct {
	Name      string
	Mark      uint32
	Interface string     // optional; checked at start; required when managed
	Gateway   netip.Addr // IPv4 default gateway (managed)
	Gateway6  netip.Addr // IPv6 default gateway (managed)
	// GatewayAuto: gateway (IPv4, [0]) or gateway6 ([1]) is "auto", the
	// default route the interface's DHCP or RA client installs.
	GatewayAuto [2]bool
	Table       uint32  // routing table (managed)
	Health      *Health // [uplink.health]; nil: no probes
	// Fallback is where traffic the host marked for this uplink goes while
	// it is down: another uplink, or nil for the host's own routing
	// ("default"), untranslated. FallbackName is as written.
	Fallback     *Uplink
	FallbackName string
	// KeepTCP: when the uplink's address a translated TCP connection uses
	// goes away, only remove its translation (reset_tcp = false) instead
	// of closing the socket so that the application learns at once.
	KeepTCP bool
	// Standby: the uplink carries nothing but its probes while a
	// non-standby uplink is up in the family: it is held down for new
	// flows, rules fall over to it, host marks follow their fallback.
	Standby bool
	// Quota: bytes (in and out) the uplink may carry each QuotaPeriod
	// ("day", "week" or "month"), from day QuotaReset of the period (a
	// weekday 1–7 from Monday, or a day of the month 1–28); 0: none. Past
	// it the uplink is down for new flows; ResetOnQuota closes its live
	// TCP connections too (on_quota = "reset").
	Quota        uint64
	QuotaPeriod  string
	QuotaReset   int
	ResetOnQuota bool
}

// Managed reports whether rerouted installs the uplink's routing.
func (u *Uplink) Managed() bool { return u.Table != 0 }

// Defaults applied to keys the file leaves out.
const (
	DefaultControlSocket = "/run/rerouted/rerouted.sock"
	DefaultGCInterval    = 2 * time.Second
	DefaultIdleTimeout   = 120 * time.Second
	DefaultStickyFor     = 10 * time.Minute
	// DefaultNewFlowsPerUID is per user: its burst (twice as many) stays
	// well below what fills a queue (queue.QueueLen, 16,384 packets),
	// even when every flow of the burst meets on one queue.
	DefaultNewFlowsPerUID = 1000
)

// Error is one problem in a configuration file.
type Error struct {
	File      string
	Line, Col int
	Msg       string
}

func (e *Error) Error() string { return fmt.Sprintf("%s:%d:%d: %s", e.File, e.Line, e.Col, e.Msg) }

// Errors is every problem found in one file, in file order.
type Errors []*Error

func (es Errors) Error() string {
	s := make([]string, len(es))
	for i, e := range es {
		s[i] = e.Error()
	}
	return strings.Join(s, "\n")
}

// Load reads and validates a configuration file. A non-nil error is either an
// I/O error or Errors.
func Load(file string) (*Config, error) {
	src, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("read config: %w", err)
	}
	return Parse(file, src)
}

// Parse validates a configuration held in memory; file names it in errors.
func Parse(file string, src []byte) (*Config, error) {
	text := string(src) // one copy for both readers of a possibly big file
	var raw map[string]any
	if _, err := toml.Decode(text, &raw); err != nil {
		var pe toml.ParseError
		if errors.As(err, &pe) {
			line, col := tomlpos.LineCol(src, pe.Position.Start)
			return nil, Errors{{File: file, Line: line, Col: col, Msg: pe.Message}}
		}
		return nil, Errors{{File: file, Line: 1, Col: 1, Msg: err.Error()}}
	}
	p := &parser{file: file, pos: tomlpos.Locate(text)}
	cfg := p.config(raw)
	if len(p.errs) > 0 {
		sort.SliceStable(p.errs, func(i, j int) bool {
			a, b := p.errs[i], p.errs[j]
			return a.Line < b.Line || (a.Line == b.Line && a.Col < b.Col)
		})
		return nil, p.errs
	}
	return cfg, nil
}

// parser turns the generic TOML tree into a Config, collecting every error.
type parser struct {
	file string
	pos  tomlpos.Index
	errs Errors
}

func (p *parser) errorf(path string, format string, args ...any) {
	l, c := p.pos.Of(path)
	p.errs = append(p.errs, &Error{File: p.file, Line: l, Col: c, Msg: fmt.Sprintf(format, args...)})
}

func (p *parser) config(raw map[string]any) *Config {
	cfg := &Config{File: p.file, Daemon: Daemon{
		HonorMarks:     true,
		ControlSocket:  DefaultControlSocket,
		GCInterval:     DefaultGCInterval,
		IdleTimeout:    DefaultIdleTimeout,
		Datapath:       "kernel",
		Steering:       "connect",
		HostMarks:      "kernel",
		Queues:         runtime.NumCPU(),
		NewFlowsPerUID: DefaultNewFlowsPerUID,
	}, Usage: Usage{Enabled: true, State: DefaultUsageState(), Interval: 5 * time.Second, Top: 10}}
	for _, k := range sortedKeys(raw) {
		v := raw[k]
		if !slices.Contains(Keys[""], k) {
			p.errorf(k, "unknown key %q (expected daemon, uplink, rule or usage)", k)
			continue
		}
		switch k {
		case "daemon":
			p.daemon(&cfg.Daemon, v)
		case "usage":
			p.usage(&cfg.Usage, v)
		case "uplink":
			for i, t := range p.tables(k, v) {
				if u := p.uplink(fmt.Sprintf("uplink.%d", i), t); u != nil {
					cfg.Uplinks = append(cfg.Uplinks, u)
				}
			}
		case "rule":
			for i, t := range p.tables(k, v) {
				if r := p.rule(fmt.Sprintf("rule.%d", i), t); r != nil {
					cfg.Rules = append(cfg.Rules, r)
				}
			}
		default:
			p.undecoded(k, k)
		}
	}
	p.link(cfg)
	if !cfg.Usage.Enabled {
		for i, u := range cfg.Uplinks {
			if u.Quota > 0 {
				p.errorf(fmt.Sprintf("uplink.%d.quota", i), "a quota is counted by usage accounting: [usage] enabled = false turns it off")
			}
		}
	}
	return cfg
}

func (p *parser) daemon(d *Daemon, v any) {
	t, ok := v.(map[string]any)
	if !ok {
		p.errorf("daemon", "daemon must be a table")
		return
	}
	for _, k := range sortedKeys(t) {
		path := "daemon." + k
		if !slices.Contains(Keys["daemon"], k) {
			p.errorf(path, "unknown key %q in [daemon]", k)
			continue
		}
		switch k {
		case "queue":
			if n, ok := p.integer(path, t[k], 0, 65535); ok {
				d.Queue = uint16(n)
			}
		case "honor_marks":
			if b, ok := t[k].(bool); ok {
				d.HonorMarks = b
			} else {
				p.errorf(path, "honor_marks must be true or false")
			}
		case "control_socket":
			if s, ok := t[k].(string); ok && strings.HasPrefix(s, "/") {
				d.ControlSocket = s
			} else {
				p.errorf(path, "control_socket must be an absolute path")
			}
		case "datapath":
			s, _ := t[k].(string)
			if s != "kernel" && s != "userspace" {
				p.errorf(path, "datapath must be \"kernel\" or \"userspace\"")
				continue
			}
			d.Datapath = s
		case "queues":
			if n, ok := p.integer(path, t[k], 1, 64); ok {
				d.Queues = int(n)
			}
		case "gc_interval":
			s, _ := t[k].(string)
			dur, err := time.ParseDuration(s)
			if err != nil || dur < 100*time.Millisecond || dur > time.Hour {
				p.errorf(path, "gc_interval must be a duration between 100ms and 1h, like \"2s\"")
				continue
			}
			d.GCInterval = dur
		case "new_flows_per_uid":
			if n, ok := p.integer(path, t[k], 0, 10000000); ok {
				d.NewFlowsPerUID = int(n)
			}
		case "steering":
			switch t[k] {
			case "queue", "connect":
				d.Steering = t[k].(string)
				d.SteeringSet = true
			default:
				p.errorf(path, "steering must be \"connect\" (rules decided at connect(): the socket is bound to its uplink's address) or \"queue\" (every new flow's first packet goes to the daemon)")
			}
		case "host_marks":
			switch t[k] {
			case "kernel", "queue":
				d.HostMarks = t[k].(string)
			default:
				p.errorf(path, "host_marks must be \"kernel\" (the kernel decides a host-marked flow itself) or \"queue\" (its first packet goes to the daemon)")
			}
		case "on_failure":
			switch t[k] {
			case "open":
			case "closed":
				d.FailClosed = true
			default:
				p.errorf(path, "on_failure must be \"open\" (what cannot be translated leaves as the host's routing sends it) or \"closed\" (it is dropped)")
			}
		case "metrics_listen":
			s, _ := t[k].(string)
			if _, port, err := net.SplitHostPort(s); err != nil || port == "" {
				p.errorf(path, "metrics_listen must be host:port, like \"127.0.0.1:9477\"")
				continue
			}
			d.MetricsListen = s
		case "idle_timeout":
			s, _ := t[k].(string)
			dur, err := time.ParseDuration(s)
			if err != nil || dur < time.Second || dur > 24*time.Hour {
				p.errorf(path, "idle_timeout must be a duration between 1s and 24h, like \"120s\"")
				continue
			}
			d.IdleTimeout = dur
		default:
			p.undecoded(path, k)
		}
	}
}

func (p *parser) usage(u *Usage, v any) {
	t, ok := v.(map[string]any)
	if !ok {
		p.errorf("usage", "usage must be a table")
		return
	}
	for _, k := range sortedKeys(t) {
		path := "usage." + k
		if !slices.Contains(Keys["usage"], k) {
			p.errorf(path, "unknown key %q in [usage]", k)
			continue
		}
		switch k {
		case "enabled":
			if b, ok := t[k].(bool); ok {
				u.Enabled = b
			} else {
				p.errorf(path, "enabled must be true or false")
			}
		case "state":
			if s, ok := t[k].(string); ok && strings.HasPrefix(s, "/") && !strings.HasSuffix(s, "/") {
				u.State = s
			} else {
				p.errorf(path, "state must be the absolute path of a file, like \"/var/lib/rerouted/usage.json\"")
			}
		case "interval":
			s, _ := t[k].(string)
			dur, err := time.ParseDuration(s)
			if err != nil || dur < time.Second || dur > time.Hour {
				p.errorf(path, "interval must be a duration between 1s and 1h, like \"5s\"")
				continue
			}
			u.Interval = dur
		case "top":
			if n, ok := p.integer(path, t[k], 1, 1000); ok {
				u.Top = int(n)
			}
		default:
			p.undecoded(path, k)
		}
	}
}

func (p *parser) uplink(path string, t map[string]any) *Uplink {
	u := &Uplink{}
	for _, k := range sortedKeys(t) {
		kp := path + "." + k
		if !slices.Contains(Keys["uplink"], k) {
			p.errorf(kp, "unknown key %q in [[uplink]]", k)
			continue
		}
		switch k {
		case "name":
			u.Name = p.name(kp, t[k])
		case "health":
			u.Health = p.health(kp, t[k])
		case "fallback":
			n, ok := t[k].(string)
			if !ok || n == "" {
				p.errorf(kp, "fallback must be the name of another [[uplink]], or \"default\"")
				continue
			}
			u.FallbackName = n
		case "standby":
			b, ok := t[k].(bool)
			if !ok {
				p.errorf(kp, "standby must be true or false")
				continue
			}
			u.Standby = b
		case "quota":
			n, err := ParseSize(t[k])
			if err != nil || n == 0 {
				p.errorf(kp, "quota must be a size, like \"50GiB\" or \"500MB\"")
				continue
			}
			u.Quota = n
		case "quota_period":
			switch t[k] {
			case "day", "week", "month":
				u.QuotaPeriod = t[k].(string)
			default:
				p.errorf(kp, "quota_period must be \"day\", \"week\" or \"month\"")
			}
		case "quota_reset":
			if n, ok := p.integer(kp, t[k], 1, 28); ok {
				u.QuotaReset = int(n)
			}
		case "on_quota":
			switch t[k] {
			case "keep":
			case "reset":
				u.ResetOnQuota = true
			default:
				p.errorf(kp, "on_quota must be \"keep\" (live connections carry on past the quota) or \"reset\" (they are closed)")
			}
		case "reset_tcp":
			b, ok := t[k].(bool)
			if !ok {
				p.errorf(kp, "reset_tcp must be true or false")
				continue
			}
			u.KeepTCP = !b
		case "mark":
			if n, ok := p.integer(kp, t[k], 1, 0xffffffff); ok {
				u.Mark = uint32(n)
			}
		case "interface":
			s, ok := t[k].(string)
			if !ok || s == "" || len(s) > 15 || strings.ContainsAny(s, "/ \t") {
				p.errorf(kp, "interface must be an interface name")
				continue
			}
			u.Interface = s
		case "gateway", "gateway6":
			s, _ := t[k].(string)
			if s == "auto" {
				// Whatever default route the interface's DHCP or RA
				// client installs.
				u.GatewayAuto[map[string]int{"gateway": 0, "gateway6": 1}[k]] = true
				continue
			}
			a, err := netip.ParseAddr(s)
			switch {
			case err != nil || a.Zone() != "":
				p.errorf(kp, "%s must be an IP address, like \"203.0.113.1\", or \"auto\"", k)
			case k == "gateway" && !a.Is4():
				p.errorf(kp, "gateway must be an IPv4 address (use gateway6 for IPv6)")
			case k == "gateway6" && !a.Is6():
				p.errorf(kp, "gateway6 must be an IPv6 address")
			case k == "gateway":
				u.Gateway = a
			default:
				u.Gateway6 = a
			}
		case "table":
			if n, ok := p.integer(kp, t[k], 1, 0xffffffff); ok {
				if n == 253 || n == 254 || n == 255 {
					p.errorf(kp, "table %d is the kernel's own (default, main, local); pick another", n)
					continue
				}
				u.Table = uint32(n)
			}
		default:
			p.undecoded(kp, k)
		}
	}
	_, hasTable := t["table"]
	_, gw := t["gateway"]
	_, gw6 := t["gateway6"]
	switch {
	case hasTable && !gw && !gw6:
		p.errorf(path, "a managed [[uplink]] needs gateway or gateway6 with its table")
	case (gw || gw6) && !hasTable:
		p.errorf(path, "a managed [[uplink]] needs a table for its gateway")
	case hasTable && u.Interface == "":
		p.errorf(path, "a managed [[uplink]] needs its interface")
	}
	if _, ok := t["health"]; ok && u.Interface == "" {
		p.errorf(path+".health", "an [[uplink]] with [uplink.health] needs its interface: probes are sent from its addresses")
	}
	if _, ok := t["quota"]; !ok {
		for _, k := range []string{"quota_period", "quota_reset", "on_quota"} {
			if _, ok := t[k]; ok {
				p.errorf(path+"."+k, "%s needs a quota", k)
			}
		}
	}
	if u.QuotaPeriod == "" {
		u.QuotaPeriod = "month"
	}
	if u.QuotaReset == 0 {
		u.QuotaReset = 1
	}
	switch {
	case u.QuotaPeriod == "week" && u.QuotaReset > 7:
		p.errorf(path+".quota_reset", "quota_reset of a week is a weekday, 1 (Monday) to 7 (Sunday)")
	case u.QuotaPeriod == "day" && u.QuotaReset != 1:
		p.errorf(path+".quota_reset", "a daily quota restarts at midnight: quota_reset must be 1 or left out")
	}
	if _, ok := t["name"]; !ok {
		p.errorf(path, "[[uplink]] needs a name")
	}
	if _, ok := t["mark"]; !ok {
		p.errorf(path, "[[uplink]] needs a mark (the fwmark of its routing table)")
	}
	return u
}

func (p *parser) rule(path string, t map[string]any) *Rule {
	r := &Rule{}
	r.line, _ = p.pos.Of(path)
	d := &ruleDraft{r: r, ids: map[string][]uint32{}}
	for _, k := range sortedKeys(t) {
		kp := path + "." + k
		base, neg := strings.CutPrefix(k, "not_")
		key, known := ruleKeys[base]
		switch {
		case neg && (!known || !key.negatable):
			p.errorf(kp, "unknown key %q in [[rule]] (not_ works with %s)", k, negatableList)
			continue
		case !known:
			p.errorf(kp, "unknown key %q in [[rule]]", k)
			continue
		}
		c, isCond := key.decode(p, d, k, kp, t[k])
		if !isCond {
			continue
		}
		c.Key, c.Neg = k, neg
		r.conds = append(r.conds, c)
	}
	ids := d.ids
	for _, k := range []string{"uid", "not_uid", "gid", "not_gid"} {
		if len(ids[k]) == 0 {
			continue
		}
		var c match.Cond
		if strings.HasSuffix(k, "uid") {
			c = match.UID(k, ids[k])
		} else {
			c = match.GID(k, ids[k])
		}
		c.Key, c.Neg = k, strings.HasPrefix(k, "not_")
		r.conds = append(r.conds, c)
	}
	sort.SliceStable(r.conds, func(i, j int) bool { return r.conds[i].Cost < r.conds[j].Cost })
	_, hasUplink := t["uplink"]
	_, hasMark := t["mark"]
	if _, ok := t["on_down"]; ok && r.Action.Kind != ActUplink && r.Action.Kind != ActBalance {
		p.errorf(path+".on_down", "on_down goes with uplink = \"NAME\", a list of uplinks, or balance")
	}
	r.Action.DropWhenDown = r.dropWhenDown
	_, hasBalance := t["balance"]
	if hasBalance {
		r.Action.Sticky, r.Action.StickyFor = r.sticky, r.stickyFor
		if r.Action.StickyFor == 0 {
			r.Action.StickyFor = DefaultStickyFor
		}
	}
	if _, ok := t["sticky_for"]; ok && !r.sticky {
		p.errorf(path+".sticky_for", "sticky_for goes with sticky = \"destination\"")
	}
	if r.sticky && !hasBalance {
		p.errorf(path+".sticky", "sticky goes with balance")
	}
	if hasBalance && (t["uplink"] != nil || t["mark"] != nil) {
		p.errorf(path+".balance", "a rule takes one of uplink, balance or mark")
	}
	switch {
	case hasUplink && hasMark:
		p.errorf(path+".mark", "a rule takes uplink or mark, not both")
	case !hasUplink && !hasMark && !hasBalance:
		p.errorf(path, "[[rule]] needs an action: uplink = \"NAME\", uplink = \"default\", balance = { ... } or mark = N")
	}
	if r.Name == "" {
		r.Name = fmt.Sprintf("rule@%d", r.line)
	}
	return r
}

// idKeys maps names written by name to the numeric key they are one with.
var idKeys = map[string]string{"user": "uid", "not_user": "not_uid", "group": "gid", "not_group": "not_gid"}

// Keys is every key the parser accepts, by table ("": the top level,
// "uplink.health": [uplink.health]). Any other key is an unknown key, an
// error; docs/configuration.md documents each of these (its test checks).
// A [[rule]]'s keys are ruleKeys' (and not_ forms of the negatable).
var Keys = map[string][]string{
	"":              {"daemon", "uplink", "rule", "usage"},
	"usage":         {"enabled", "state", "interval", "top"},
	"daemon":        {"queue", "queues", "honor_marks", "control_socket", "metrics_listen", "gc_interval", "idle_timeout", "datapath", "on_failure", "steering", "host_marks", "new_flows_per_uid"},
	"uplink":        {"name", "mark", "interface", "gateway", "gateway6", "table", "fallback", "reset_tcp", "health", "standby", "quota", "quota_period", "quota_reset", "on_quota"},
	"uplink.health": {"targets", "interval", "timeout", "down_after", "up_after"},
	"rule":          ruleKeyNames(),
}

// undecoded reports a key Keys lists that the parser has no decoder for:
// a mistake in this package, which its tests catch.
func (p *parser) undecoded(path, k string) {
	p.errorf(path, "internal error: key %q is known but not decoded", k)
}

// negatableList names the keys that take a not_ form (ruleKeys), for
// errors.
const negatableList = "dst, dport, user, uid, group, gid, process, exe, cgroup"

func lookupID(kind, name string) (uint32, error) {
	var id string
	if kind == "user" {
		u, err := user.Lookup(name)
		if err != nil {
			return 0, fmt.Errorf("unknown user %q", name)
		}
		id = u.Uid
	} else {
		g, err := user.LookupGroup(name)
		if err != nil {
			return 0, fmt.Errorf("unknown group %q", name)
		}
		id = g.Gid
	}
	n, err := strconv.ParseUint(id, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("%s %q has a non-numeric id %q", kind, name, id)
	}
	return uint32(n), nil
}

// link resolves rule→uplink names and checks uniqueness.
func (p *parser) link(cfg *Config) {
	byName := map[string]*Uplink{}
	byMark := map[uint32]string{}
	byTable := map[uint32]string{}
	for i, u := range cfg.Uplinks {
		if other, dup := byTable[u.Table]; dup && u.Table != 0 {
			p.errorf(fmt.Sprintf("uplink.%d.table", i), "uplinks %q and %q share table %d", other, u.Name, u.Table)
		}
		byTable[u.Table] = u.Name
		path := fmt.Sprintf("uplink.%d", i)
		if u.Name == "" {
			continue
		}
		if u.Name == "default" {
			p.errorf(path+".name", "\"default\" is reserved: uplink = \"default\" means the normal route")
		}
		if _, dup := byName[u.Name]; dup {
			p.errorf(path+".name", "uplink %q is defined twice", u.Name)
		}
		byName[u.Name] = u
		if other, dup := byMark[u.Mark]; dup && u.Mark != 0 {
			p.errorf(path+".mark", "uplinks %q and %q share mark %d", other, u.Name, u.Mark)
		}
		byMark[u.Mark] = u.Name
	}
	seen := map[string]bool{}
	for i, r := range cfg.Rules {
		path := fmt.Sprintf("rule.%d", i)
		if seen[r.Name] {
			p.errorf(path+".name", "rule name %q is used twice", r.Name)
		}
		seen[r.Name] = true
		if (r.Action.Kind != ActUplink && r.Action.Kind != ActBalance) || r.Action.UplinkName == "" {
			continue
		}
		for j := range r.Action.Choices {
			c := &r.Action.Choices[j]
			if c.Name == "default" {
				continue
			}
			u, ok := byName[c.Name]
			if !ok {
				p.errorf(path+".uplink", "unknown uplink %q (defined: %s, or \"default\")", c.Name, definedUplinks(byName))
				continue
			}
			c.Uplink = u
		}
		if u := r.Action.Choices[0].Uplink; u != nil {
			r.Action.Uplink, r.Action.Mark = u, u.Mark
		}
	}
	for i, u := range cfg.Uplinks {
		if u.FallbackName == "" || u.FallbackName == "default" {
			continue
		}
		f, ok := byName[u.FallbackName]
		switch {
		case !ok:
			p.errorf(fmt.Sprintf("uplink.%d.fallback", i), "unknown uplink %q (defined: %s, or \"default\")", u.FallbackName, definedUplinks(byName))
		case f == u:
			p.errorf(fmt.Sprintf("uplink.%d.fallback", i), "an uplink cannot be its own fallback")
		default:
			u.Fallback = f
		}
	}
}

func definedUplinks(byName map[string]*Uplink) string {
	names := make([]string, 0, len(byName))
	for n := range byName {
		names = append(names, fmt.Sprintf("%q", n))
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// --- typed value helpers ---

func (p *parser) tables(path string, v any) []map[string]any {
	switch t := v.(type) {
	case []map[string]any:
		return t
	case []any:
		out := make([]map[string]any, 0, len(t))
		for _, x := range t {
			if m, ok := x.(map[string]any); ok {
				out = append(out, m)
			} else {
				p.errorf(path, "%s must be written as [[%s]] tables", path, path)
			}
		}
		return out
	}
	p.errorf(path, "%s must be written as [[%s]] tables", path, path)
	return nil
}

func (p *parser) name(path string, v any) string {
	s, ok := v.(string)
	if !ok || strings.TrimSpace(s) == "" {
		p.errorf(path, "name must be a non-empty string")
		return ""
	}
	if strings.ContainsAny(s, "\"\n") {
		p.errorf(path, "name must not contain quotes or newlines")
		return ""
	}
	return s
}

func (p *parser) integer(path string, v any, lo, hi int64) (int64, bool) {
	n, ok := v.(int64)
	if !ok {
		p.errorf(path, "%s must be an integer", lastElem(path))
		return 0, false
	}
	if n < lo || n > hi {
		p.errorf(path, "%s %d is out of range %d-%d", lastElem(path), n, lo, hi)
		return 0, false
	}
	return n, true
}

func (p *parser) strings(path string, v any) []string {
	l := list(v)
	out := make([]string, 0, len(l))
	for _, x := range l {
		s, ok := x.(string)
		if !ok {
			p.errorf(path, "%s takes strings", lastElem(path))
			continue
		}
		out = append(out, s)
	}
	return out
}

// ports accepts 80, "80", "8000-8100" and lists of them.
func (p *parser) ports(path string, v any) []PortRange {
	var out []PortRange
	for _, x := range list(v) {
		switch t := x.(type) {
		case int64:
			if t < 1 || t > 65535 {
				p.errorf(path, "port %d is outside 1-65535", t)
				continue
			}
			out = append(out, PortRange{Lo: uint16(t), Hi: uint16(t)})
		case string:
			lo, hi, isRange := strings.Cut(t, "-")
			a, err1 := strconv.ParseUint(strings.TrimSpace(lo), 10, 32)
			b := a
			var err2 error
			if isRange {
				b, err2 = strconv.ParseUint(strings.TrimSpace(hi), 10, 32)
			}
			switch {
			case err1 != nil || err2 != nil:
				p.errorf(path, "bad port or range %q (want 80 or \"8000-8100\")", t)
			case a < 1 || a > 65535 || b < 1 || b > 65535:
				p.errorf(path, "port range %q is outside 1-65535", t)
			case a > b:
				p.errorf(path, "port range %q is reversed", t)
			default:
				out = append(out, PortRange{Lo: uint16(a), Hi: uint16(b)})
			}
		default:
			p.errorf(path, "dport takes port numbers and \"a-b\" ranges")
		}
	}
	return out
}

func list(v any) []any {
	if l, ok := v.([]any); ok {
		return l
	}
	return []any{v}
}

func lastElem(path string) string { return path[strings.LastIndexByte(path, '.')+1:] }

func sortedKeys(m map[string]any) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

// ParseSize reads a size: bytes as an integer, or a number with a unit,
// decimal (kB, MB, GB, TB) or binary (KiB, MiB, GiB, TiB), like "50GiB"
// or "1.5 TB".
func ParseSize(v any) (uint64, error) {
	switch n := v.(type) {
	case int64:
		if n < 0 {
			return 0, fmt.Errorf("negative size %d", n)
		}
		return uint64(n), nil
	case string:
		s := strings.TrimSpace(n)
		i := strings.IndexFunc(s, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
		if i <= 0 {
			if i < 0 {
				i = len(s)
			} else {
				return 0, fmt.Errorf("size %q: no number", n)
			}
		}
		num, err := strconv.ParseFloat(s[:i], 64)
		if err != nil || num < 0 {
			return 0, fmt.Errorf("size %q: %v", n, err)
		}
		units := map[string]float64{"": 1, "B": 1, "kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
			"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
		mul, ok := units[strings.TrimSpace(s[i:])]
		if !ok {
			return 0, fmt.Errorf("size %q: unknown unit %q (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)", n, strings.TrimSpace(s[i:]))
		}
		if num*mul >= 1<<63 {
			return 0, fmt.Errorf("size %q: too large", n)
		}
		return uint64(num * mul), nil
	}
	return 0, fmt.Errorf("a size must be a string like \"50GiB\", or a number of bytes")
}

// QuotaStart is when the quota period that now is in began: midnight,
// local time, of the day the count restarts (QuotaReset) in this day,
// week or month, or in the last one if that day is yet to come.
func (u *Uplink) QuotaStart(now time.Time) time.Time {
	y, m, d := now.Date()
	day := time.Date(y, m, d, 0, 0, 0, 0, now.Location())
	switch u.QuotaPeriod {
	case "day":
		return day
	case "week":
		wd := (int(now.Weekday())+6)%7 + 1 // 1 Monday … 7 Sunday
		back := (wd - u.QuotaReset + 7) % 7
		return day.AddDate(0, 0, -back)
	}
	start := time.Date(y, m, u.QuotaReset, 0, 0, 0, 0, now.Location())
	if start.After(now) {
		start = start.AddDate(0, -1, 0)
	}
	return start
}
