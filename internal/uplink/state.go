package uplink

import (
	"fmt"
	"net"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rerouted/rerouted/internal/policy"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// An uplink is up, per address family, when its link is up, it has an
// address of that family, and a route marked with its mark leaves through
// its interface. (Health probes, where configured, add their verdict.)
// Link and address events act at once: the daemon calls Update on every
// burst of routing changes.

// Status is one uplink's state in one family.
type Status struct {
	Uplink string       `json:"uplink"`
	Family string       `json:"family"` // "ipv4" or "ipv6"
	Up     bool         `json:"up"`
	Since  time.Time    `json:"since"`
	Why    string       `json:"why,omitempty"` // why it is down
	Addrs  []netip.Addr `json:"addresses"`
	Dev    string       `json:"dev,omitempty"` // where its marked route leads
	// Src is the source address its marked route prefers: what sockets
	// steered to it at connect() are bound to.
	Src netip.Addr `json:"src,omitempty"`
	// MTU is its marked route's MTU (the route's own, else its link's):
	// what a translated SYN's MSS is clamped to.
	MTU int `json:"mtu,omitempty"`
	// Probes, with [uplink.health] targets of the family: the last
	// round's best round-trip time and the share of the last rounds
	// in which every target failed.
	Probed bool          `json:"probed"`
	RTT    time.Duration `json:"rtt_ns,omitempty"`
	Loss   float64       `json:"loss"`
	// Standby: a standby uplink held down while a primary is up.
	Standby bool `json:"standby,omitempty"`
	// Quota is its quota for the period (bytes, 0: none), QuotaUsed what
	// it has carried of it.
	Quota     uint64 `json:"quota_bytes,omitempty"`
	QuotaUsed uint64 `json:"quota_used_bytes,omitempty"`
}

// Transition is a change of an uplink's state.
type Transition struct{ Status }

// States is the state of every uplink: what the kernel says of its link,
// addresses and route (Update), and what its probes say (SetProbe). The
// packet path reads it without a lock or an allocation.
type States struct {
	mu      sync.Mutex
	uplinks []*policy.Uplink
	base    map[uint32]*[2]Status // by mark; [0] IPv4, [1] IPv6
	probes  map[uint32]*[2]probeVerdict
	quotas  map[uint32]quotaState
	snap    atomic.Pointer[snapshot]
}

type quotaState struct {
	used, limit uint64
}

type probeVerdict struct {
	set  bool // the prober has a verdict
	ok   bool
	why  string
	rtt  time.Duration
	loss float64
}

type snapshot struct {
	byMark map[uint32]*[2]Status
	list   []Status
}

// Up reports whether the uplink with mark is up for the family of an
// address (v6). Marks that are no configured uplink's are always up: the
// daemon knows nothing of them.
func (s *States) Up(mark uint32, v6 bool) bool {
	sn := s.snap.Load()
	if sn == nil {
		return true
	}
	st, ok := sn.byMark[mark]
	if !ok {
		return true
	}
	if v6 {
		return st[1].Up
	}
	return st[0].Up
}

// Get returns the state of the uplink with mark in one family.
func (s *States) Get(mark uint32, v6 bool) (Status, bool) {
	sn := s.snap.Load()
	if sn == nil {
		return Status{}, false
	}
	st, ok := sn.byMark[mark]
	if !ok {
		return Status{}, false
	}
	if v6 {
		return st[1], true
	}
	return st[0], true
}

// List returns every uplink's state, by name then family.
func (s *States) List() []Status {
	sn := s.snap.Load()
	if sn == nil {
		return nil
	}
	return append([]Status(nil), sn.list...)
}

// Probe destinations for the marked route: any address only the default
// route covers will do; these are documentation addresses, never sent to.
var routeProbe = [2]netip.Addr{netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")}

// Update reads the uplinks' link, address and route state from the kernel
// and returns the transitions it makes.
func (s *States) Update(h *netlink.Handle, uplinks []*policy.Uplink, now time.Time) ([]Transition, error) {
	base := make(map[uint32]*[2]Status, len(uplinks))
	for _, u := range uplinks {
		var st [2]Status
		for fi, family := range []int{unix.AF_INET, unix.AF_INET6} {
			cur, err := check(h, u, family, fi)
			if err != nil {
				return nil, fmt.Errorf("uplink %q: %w", u.Name, err)
			}
			cur.Uplink, cur.Family = u.Name, [2]string{"ipv4", "ipv6"}[fi]
			st[fi] = cur
		}
		base[u.Mark] = &st
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.uplinks, s.base = uplinks, base
	return s.publish(now), nil
}

// SetProbe records a prober's verdict on the uplink with mark, in one
// family, and returns the transitions it makes.
func (s *States) SetProbe(mark uint32, v6 bool, ok bool, why string, rtt time.Duration, loss float64, now time.Time) []Transition {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.probes == nil {
		s.probes = map[uint32]*[2]probeVerdict{}
	}
	pv := s.probes[mark]
	if pv == nil {
		pv = &[2]probeVerdict{}
		s.probes[mark] = pv
	}
	fi := 0
	if v6 {
		fi = 1
	}
	pv[fi] = probeVerdict{set: true, ok: ok, why: why, rtt: rtt, loss: loss}
	return s.publish(now)
}

// SetQuota records what the uplink with mark has used of its quota this
// period (limit 0: none): at the limit, it is down for new flows.
func (s *States) SetQuota(mark uint32, used, limit uint64, now time.Time) []Transition {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.quotas == nil {
		s.quotas = map[uint32]quotaState{}
	}
	if s.quotas[mark] == (quotaState{used, limit}) {
		return nil
	}
	s.quotas[mark] = quotaState{used, limit}
	return s.publish(now)
}

// publish combines the kernel's and the probes' verdicts into a new
// snapshot, and returns what changed. Call with mu held.
func (s *States) publish(now time.Time) []Transition {
	old := s.snap.Load()
	sn := &snapshot{byMark: make(map[uint32]*[2]Status, len(s.uplinks))}
	var out []Transition
	type state struct {
		u  *policy.Uplink
		st *[2]Status
	}
	var all []state
	var primary [2]string // a non-standby uplink that is up, per family
	for _, u := range s.uplinks {
		b, ok := s.base[u.Mark]
		if !ok {
			continue
		}
		st := *b
		for fi := range st {
			cur := &st[fi]
			if pv := s.probes[u.Mark]; pv != nil && pv[fi].set {
				cur.Probed, cur.RTT, cur.Loss = true, pv[fi].rtt, pv[fi].loss
				if cur.Up && !pv[fi].ok {
					cur.Up, cur.Why = false, pv[fi].why
				}
			}
			if q := s.quotas[u.Mark]; q.limit > 0 {
				cur.Quota, cur.QuotaUsed = q.limit, q.used
				if cur.Up && q.used >= q.limit {
					cur.Up, cur.Why = false, fmt.Sprintf("over its quota: %d of %d bytes used this period", q.used, q.limit)
				}
			}
			if cur.Up && !u.Standby && primary[fi] == "" {
				primary[fi] = u.Name
			}
		}
		all = append(all, state{u, &st})
	}
	for _, a := range all {
		u, st := a.u, *a.st
		for fi := range st {
			cur := &st[fi]
			if u.Standby && cur.Up && primary[fi] != "" {
				cur.Up, cur.Standby, cur.Why = false, true, "standby while "+primary[fi]+" is up"
			}
			cur.Since = now
			if old != nil {
				if prev, ok := old.byMark[u.Mark]; ok && prev[fi].Uplink == u.Name {
					if prev[fi].Up == cur.Up {
						cur.Since = prev[fi].Since
					} else {
						out = append(out, Transition{*cur})
					}
				}
			}
		}
		sn.byMark[u.Mark] = &st
		sn.list = append(sn.list, st[0], st[1])
	}
	sort.SliceStable(sn.list, func(i, j int) bool { return sn.list[i].Uplink < sn.list[j].Uplink })
	s.snap.Store(sn)
	return out
}

// check reads one uplink's state in one family.
func check(h *netlink.Handle, u *policy.Uplink, family, fi int) (Status, error) {
	var st Status
	var link netlink.Link
	if u.Interface != "" {
		l, err := h.LinkByName(u.Interface)
		if err != nil {
			st.Why = fmt.Sprintf("interface %s: %v", u.Interface, err)
			return st, nil
		}
		link = l
		a := l.Attrs()
		if a.Flags&net.FlagUp == 0 || (a.OperState != netlink.OperUp && a.OperState != netlink.OperUnknown) {
			st.Why = fmt.Sprintf("link %s is down", u.Interface)
			return st, nil
		}
		addrs, err := h.AddrList(l, family)
		if err != nil {
			return st, fmt.Errorf("addresses of %s: %w", u.Interface, err)
		}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok && a.IP.IsGlobalUnicast() {
				st.Addrs = append(st.Addrs, ip.Unmap())
			}
		}
		if len(st.Addrs) == 0 {
			st.Why = fmt.Sprintf("no %s address on %s", [2]string{"IPv4", "IPv6"}[fi], u.Interface)
			return st, nil
		}
	}
	rs, err := h.RouteGetWithOptions(net.IP(routeProbe[fi].AsSlice()), &netlink.RouteGetOptions{Mark: u.Mark})
	if err != nil || len(rs) == 0 {
		st.Why = fmt.Sprintf("no route with mark %d", u.Mark)
		return st, nil
	}
	if l, err := h.LinkByIndex(rs[0].LinkIndex); err == nil {
		st.Dev, st.MTU = l.Attrs().Name, l.Attrs().MTU
	}
	if rs[0].MTU > 0 {
		st.MTU = rs[0].MTU
	}
	if src, ok := netip.AddrFromSlice(rs[0].Src); ok {
		st.Src = src.Unmap()
	}
	if link != nil && rs[0].LinkIndex != link.Attrs().Index {
		st.Why = fmt.Sprintf("the route with mark %d leads out %s, not %s (no route in its table?)", u.Mark, st.Dev, u.Interface)
		return st, nil
	}
	st.Up = true
	return st, nil
}

// String is the state as a line: "isp-b ipv4 up since 12:00:01 (203.0.113.2, via hb)".
func (st Status) String() string {
	state := "up"
	switch {
	case st.Standby:
		state = "standby"
	case !st.Up:
		state = "DOWN"
	}
	addrs := make([]string, len(st.Addrs))
	for i, a := range st.Addrs {
		addrs[i] = a.String()
	}
	s := fmt.Sprintf("%-12s %s %-4s since %s", st.Uplink, st.Family, state, st.Since.Format(time.RFC3339))
	if len(addrs) > 0 {
		s += " addresses " + strings.Join(addrs, ",")
	}
	if st.Dev != "" {
		s += " dev " + st.Dev
	}
	if st.Probed {
		s += fmt.Sprintf(" probes rtt %s loss %.0f%%", st.RTT.Round(10*time.Microsecond), 100*st.Loss)
	}
	if st.Quota > 0 {
		left := uint64(0)
		if st.QuotaUsed < st.Quota {
			left = st.Quota - st.QuotaUsed
		}
		s += fmt.Sprintf(" quota used %d remaining %d of %d bytes", st.QuotaUsed, left, st.Quota)
	}
	if st.Why != "" {
		s += ": " + st.Why
	}
	return s
}

// CheckInterfaces verifies that the interfaces the uplinks name exist.
func CheckInterfaces(uplinks []*policy.Uplink) error {
	for _, u := range uplinks {
		if u.Interface == "" {
			continue
		}
		if _, err := net.InterfaceByName(u.Interface); err != nil {
			return fmt.Errorf("uplink %q: interface %q: %w", u.Name, u.Interface, err)
		}
	}
	return nil
}

// DefaultLinks returns the interfaces (by index) the main table's default
// routes lead out of, IPv4 and IPv6, multipath next hops included: where
// the host's own routing sends what no uplink's mark routes.
func DefaultLinks() (map[int]bool, error) {
	out := map[int]bool{}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		routes, err := netlink.RouteListFiltered(family, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return nil, fmt.Errorf("list the main table's routes: %w", err)
		}
		for _, r := range routes {
			if r.Dst != nil && !r.Dst.IP.IsUnspecified() {
				continue
			}
			if r.Dst != nil {
				if ones, _ := r.Dst.Mask.Size(); ones != 0 {
					continue
				}
			}
			if r.LinkIndex > 0 {
				out[r.LinkIndex] = true
			}
			for _, nh := range r.MultiPath {
				if nh.LinkIndex > 0 {
					out[nh.LinkIndex] = true
				}
			}
		}
	}
	return out, nil
}
