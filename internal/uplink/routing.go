// Package uplink manages what the host's routing needs for each uplink
// rerouted manages, and keeps it there while the world moves: a route the
// kernel removed when the link went down, or a rule an operator's tool
// deleted, is put back.
package uplink

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/rerouted/rerouted/internal/policy"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Managed uplinks. For an [[uplink]] with a table and a gateway, rerouted
// installs, for each family that has a gateway:
//
//	ip route add default via GATEWAY dev INTERFACE table TABLE
//	ip rule add fwmark MARK lookup TABLE pref 1000
//	ip rule add from ADDRESS lookup TABLE pref 1001    (each address on INTERFACE)
//
// The "from" rules answer connections that arrived on the uplink through
// it: without them the replies would take the main table's default route,
// with the uplink's address, and be dropped upstream. Everything is tagged with protocol
// RouteProtocol, so what a crashed run left is recognised as rerouted's;
// what an operator configured the same way is left alone, both at start and
// at exit. On exit rerouted removes exactly what it installed.

// RouteProtocol tags rerouted's routes and rules (rtm_protocol, FRA_PROTOCOL;
// `ip route show proto 114`, `ip rule show protocol 114`).
const RouteProtocol = 114

// Rule priorities: before the main table (32766).
const (
	markRulePriority = 1000
	fromRulePriority = 1001
)

// Routing is what rerouted installed for its managed uplinks.
type Routing struct {
	h       *netlink.Handle
	log     *slog.Logger
	managed []*policy.Uplink
	routes  []netlink.Route
	rules   []netlink.Rule
}

// Install installs the routing of every managed uplink. On error it
// removes what it installed.
func Install(cfg *policy.Config, log *slog.Logger) (*Routing, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("rtnetlink: %w", err)
	}
	u := &Routing{h: h, log: log}
	for _, up := range cfg.Uplinks {
		if !up.Managed() {
			continue
		}
		u.managed = append(u.managed, up)
		if err := u.install(up); err != nil {
			return nil, errors.Join(fmt.Errorf("uplink %q: %w", up.Name, err), u.Remove())
		}
	}
	if err := u.removeStale(); err != nil {
		return nil, errors.Join(err, u.Remove())
	}
	return u, nil
}

// removeStale deletes routes and rules tagged as rerouted's that this
// configuration no longer asks for: what a run that crashed, or stopped
// for a restart, installed for an uplink since changed or removed.
func (u *Routing) removeStale() error {
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		// (RuleListFiltered ignores RT_FILTER_PROTOCOL: the protocol is
		// checked here, or every rule of the host would go.)
		rules, err := u.h.RuleList(family)
		if err != nil {
			return fmt.Errorf("list rules: %w", err)
		}
	rules:
		for _, r := range rules {
			if r.Protocol != RouteProtocol {
				continue
			}
			for _, ours := range u.rules {
				if r.Priority == ours.Priority && r.Mark == ours.Mark && r.Table == ours.Table && sameNet(r.Src, ours.Src) {
					continue rules
				}
			}
			if err := u.h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
				return fmt.Errorf("remove stale rule %s: %w", ruleString(&r), err)
			}
			u.log.Info("removed a stale uplink rule of an earlier run", "rule", ruleString(&r))
		}
		routes, err := u.h.RouteListFiltered(family, &netlink.Route{Protocol: RouteProtocol, Table: unix.RT_TABLE_UNSPEC},
			netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
		if err != nil {
			return fmt.Errorf("list routes: %w", err)
		}
	routes:
		for _, r := range routes {
			if r.Protocol != RouteProtocol {
				continue
			}
			for _, ours := range u.routes {
				if r.Table == ours.Table && r.Gw.Equal(ours.Gw) && r.LinkIndex == ours.LinkIndex {
					continue routes
				}
			}
			if err := u.h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("remove stale route table %d: %w", r.Table, err)
			}
			u.log.Info("removed a stale uplink route of an earlier run", "table", r.Table, "gateway", r.Gw.String())
		}
	}
	return nil
}

func (u *Routing) install(up *policy.Uplink) error {
	link, err := u.h.LinkByName(up.Interface)
	if err != nil {
		return fmt.Errorf("interface %q: %w", up.Interface, err)
	}
	for fi, fam := range []struct {
		family int
		gw     netip.Addr
	}{{unix.AF_INET, up.Gateway}, {unix.AF_INET6, up.Gateway6}} {
		if !fam.gw.IsValid() && !up.GatewayAuto[fi] {
			continue
		}
		gw := fam.gw
		if up.GatewayAuto[fi] {
			if gw = u.autoGateway(link, fam.family, up.Table); !gw.IsValid() {
				u.log.Warn("uplink's gateway is \"auto\" and its interface has no default route yet; its table stays empty until one comes",
					"uplink", up.Name, "interface", up.Interface, "family", [2]string{"ipv4", "ipv6"}[fi])
			}
		}
		if gw.IsValid() {
			if err := u.route(netlink.Route{LinkIndex: link.Attrs().Index, Gw: net.IP(gw.AsSlice()), Table: int(up.Table),
				Family: fam.family, Protocol: RouteProtocol}); err != nil {
				return err
			}
		}
		if err := u.rule(netlink.Rule{Family: fam.family, Mark: up.Mark, Table: int(up.Table), Priority: markRulePriority}); err != nil {
			return err
		}
		addrs, err := u.h.AddrList(link, fam.family)
		if err != nil {
			return fmt.Errorf("addresses of %s: %w", up.Interface, err)
		}
		for _, a := range addrs {
			if !a.IP.IsGlobalUnicast() {
				continue
			}
			bits := 32
			if fam.family == unix.AF_INET6 {
				bits = 128
			}
			src := &net.IPNet{IP: a.IP, Mask: net.CIDRMask(bits, bits)}
			if err := u.rule(netlink.Rule{Family: fam.family, Src: src, Table: int(up.Table), Priority: fromRulePriority}); err != nil {
				return err
			}
		}
	}
	return nil
}

// route adds the table's default route unless it is there already: left by
// a crashed run (rerouted's protocol: adopted, removed on exit) or the
// operator's (left alone). A different default route in the table is an
// error: rerouted does not take over a table someone else manages.
func (u *Routing) route(r netlink.Route) error {
	existing, err := u.h.RouteListFiltered(r.Family, &netlink.Route{Table: r.Table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list table %d: %w", r.Table, err)
	}
	for _, e := range existing {
		if e.Dst != nil && !e.Dst.IP.IsUnspecified() {
			continue // not a default route
		}
		if e.Gw.Equal(r.Gw) && e.LinkIndex == r.LinkIndex {
			if e.Protocol == RouteProtocol {
				u.routes = append(u.routes, e)
			}
			return nil
		}
		return fmt.Errorf("table %d already has a default route via %v: remove it or let rerouted manage another table", r.Table, e.Gw)
	}
	if err := u.h.RouteAdd(&r); err != nil {
		return fmt.Errorf("add default route via %v table %d: %w", r.Gw, r.Table, err)
	}
	u.routes = append(u.routes, r)
	u.log.Info("uplink route added", "table", r.Table, "gateway", r.Gw.String(), "link_index", r.LinkIndex)
	return nil
}

// rule adds an ip rule unless an identical one is there (see route).
func (u *Routing) rule(r netlink.Rule) error {
	r.Protocol = RouteProtocol
	existing, err := u.h.RuleListFiltered(r.Family, &netlink.Rule{Table: r.Table}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list rules: %w", err)
	}
	for _, e := range existing {
		if e.Mark == r.Mark && sameNet(e.Src, r.Src) && e.Dst == nil && e.IifName == "" && e.OifName == "" && !e.Invert {
			if e.Protocol == RouteProtocol {
				u.rules = append(u.rules, e)
			}
			return nil
		}
	}
	add := netlink.NewRule()
	add.Family, add.Mark, add.Src, add.Table, add.Priority, add.Protocol = r.Family, r.Mark, r.Src, r.Table, r.Priority, r.Protocol
	if err := u.h.RuleAdd(add); err != nil {
		return fmt.Errorf("add rule %v: %w", ruleString(add), err)
	}
	u.rules = append(u.rules, *add)
	u.log.Info("uplink rule added", "rule", ruleString(add))
	return nil
}

func sameNet(a, b *net.IPNet) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	return a.String() == b.String()
}

func ruleString(r *netlink.Rule) string {
	from := "all"
	if r.Src != nil {
		from = r.Src.String()
	}
	s := fmt.Sprintf("from %s", from)
	if r.Mark != 0 {
		s += fmt.Sprintf(" fwmark %#x", r.Mark)
	}
	return s + fmt.Sprintf(" lookup %d pref %d", r.Table, r.Priority)
}

// Remove deletes what Install added, rules first, and closes the socket.
func (u *Routing) Remove() error {
	var errs []error
	for i := len(u.rules) - 1; i >= 0; i-- {
		r := u.rules[i]
		if err := u.h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove rule %s: %w", ruleString(&r), err))
		}
	}
	for i := len(u.routes) - 1; i >= 0; i-- {
		r := u.routes[i]
		if err := u.h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("remove default route table %d: %w", r.Table, err))
		}
	}
	if n := len(u.rules) + len(u.routes); n > 0 {
		u.log.Info("uplink routing removed", "rules", len(u.rules), "routes", len(u.routes))
	}
	u.rules, u.routes = nil, nil
	u.h.Close()
	return errors.Join(errs...)
}

// Close closes the socket and leaves the routing in place (a stop for a
// restart: the next start adopts it).
func (u *Routing) Close() { u.h.Close() }

// Ensure puts back what was removed behind rerouted's back: a default
// route the kernel dropped when its link went down or lost its address, a
// rule someone deleted. What cannot go back yet (the link is still down)
// is returned in pending; it is tried again at the next call. The caller
// calls it on every routing change; it is cheap when nothing is missing.
func (u *Routing) Ensure() (restored, pending []string, err error) {
	if err := u.follow(); err != nil {
		return nil, nil, err
	}
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		var rules []netlink.Rule
		for i := range u.rules {
			r := &u.rules[i]
			if r.Family != family {
				continue
			}
			if rules == nil {
				if rules, err = u.h.RuleList(family); err != nil {
					return restored, pending, fmt.Errorf("list rules: %w", err)
				}
			}
			if hasRule(rules, r) {
				continue
			}
			add := netlink.NewRule()
			add.Family, add.Mark, add.Src, add.Table, add.Priority, add.Protocol = r.Family, r.Mark, r.Src, r.Table, r.Priority, RouteProtocol
			if err := u.h.RuleAdd(add); err != nil && !errors.Is(err, unix.EEXIST) {
				pending = append(pending, "rule "+ruleString(r)+": "+err.Error())
				continue
			}
			restored = append(restored, "rule "+ruleString(r))
		}
		for i := range u.routes {
			r := &u.routes[i]
			if r.Family != family {
				continue
			}
			have, err := u.h.RouteListFiltered(family, &netlink.Route{Table: r.Table}, netlink.RT_FILTER_TABLE)
			if err != nil {
				return restored, pending, fmt.Errorf("list table %d: %w", r.Table, err)
			}
			if hasDefault(have, r) {
				continue
			}
			add := *r
			if err := u.h.RouteAdd(&add); err != nil && !errors.Is(err, unix.EEXIST) {
				pending = append(pending, fmt.Sprintf("default route via %v table %d: %v", r.Gw, r.Table, err))
				continue
			}
			restored = append(restored, fmt.Sprintf("default route via %v table %d", r.Gw, r.Table))
		}
	}
	return restored, pending, nil
}

func hasRule(rules []netlink.Rule, r *netlink.Rule) bool {
	for _, e := range rules {
		if e.Priority == r.Priority && e.Mark == r.Mark && e.Table == r.Table && sameNet(e.Src, r.Src) {
			return true
		}
	}
	return false
}

func hasDefault(routes []netlink.Route, r *netlink.Route) bool {
	for _, e := range routes {
		if (e.Dst == nil || e.Dst.IP.IsUnspecified()) && e.Gw.Equal(r.Gw) && e.LinkIndex == r.LinkIndex {
			return true
		}
	}
	return false
}

// LocalAddrs returns every address the host has now, on any interface.
func (u *Routing) LocalAddrs() (map[netip.Addr]bool, error) {
	addrs, err := u.h.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("list addresses: %w", err)
	}
	out := make(map[netip.Addr]bool, len(addrs))
	for _, a := range addrs {
		if ip, ok := netip.AddrFromSlice(a.IP); ok {
			out[ip.Unmap()] = true
		}
	}
	return out, nil
}

// UpdateStates reads every uplink's state on this socket (see States.Update).
func (u *Routing) UpdateStates(s *States, uplinks []*policy.Uplink, now time.Time) ([]Transition, error) {
	return s.Update(u.h, uplinks, now)
}

// autoGateway finds the gateway of the default route the interface's
// DHCP or RA client installed (outside table, which is rerouted's own), the
// one with the lowest metric; invalid if there is none.
func (u *Routing) autoGateway(link netlink.Link, family int, table uint32) netip.Addr {
	routes, err := u.h.RouteListFiltered(family, &netlink.Route{LinkIndex: link.Attrs().Index, Table: unix.RT_TABLE_UNSPEC},
		netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
	if err != nil {
		return netip.Addr{}
	}
	var best netip.Addr
	metric := -1
	for _, r := range routes {
		if (r.Dst != nil && !r.Dst.IP.IsUnspecified()) || r.Gw == nil || r.Table == int(table) || r.Protocol == RouteProtocol {
			continue
		}
		if gw, ok := netip.AddrFromSlice(r.Gw); ok && (metric < 0 || r.Priority < metric) {
			best, metric = gw.Unmap(), r.Priority
		}
	}
	return best
}

// follow keeps managed uplinks' routing in step with their interfaces:
// a "from ADDRESS" rule for each address the interface has now (an
// address that went gets its rule removed), and with gateway = "auto" the
// table's default route via the gateway the interface's client installed
// last. What it changes is logged; it is not a repair.
func (u *Routing) follow() error {
	for _, up := range u.managed {
		link, err := u.h.LinkByName(up.Interface)
		if err != nil {
			continue // gone for now: nothing to follow
		}
		for fi, family := range []int{unix.AF_INET, unix.AF_INET6} {
			if !up.GatewayAuto[fi] && !([2]netip.Addr{up.Gateway, up.Gateway6}[fi]).IsValid() {
				continue
			}
			addrs, err := u.h.AddrList(link, family)
			if err != nil {
				return fmt.Errorf("addresses of %s: %w", up.Interface, err)
			}
			want := map[string]bool{}
			bits := [2]int{32, 128}[fi]
			for _, a := range addrs {
				if a.IP.IsGlobalUnicast() {
					src := &net.IPNet{IP: a.IP, Mask: net.CIDRMask(bits, bits)}
					want[src.String()] = true
					if !u.hasOwnRule(src, up.Table) {
						if err := u.rule(netlink.Rule{Family: family, Src: src, Table: int(up.Table), Priority: fromRulePriority}); err != nil {
							return err
						}
					}
				}
			}
			kept := u.rules[:0]
			for _, r := range u.rules {
				if r.Family == family && r.Table == int(up.Table) && r.Priority == fromRulePriority && r.Src != nil && !want[r.Src.String()] {
					if err := u.h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
						return fmt.Errorf("remove rule %s: %w", ruleString(&r), err)
					}
					u.log.Info("uplink rule removed: its address went", "rule", ruleString(&r))
					continue
				}
				kept = append(kept, r)
			}
			u.rules = kept
			if !up.GatewayAuto[fi] {
				continue
			}
			gw := u.autoGateway(link, family, up.Table)
			for i, r := range u.routes {
				if r.Family != family || r.Table != int(up.Table) {
					continue
				}
				if gw.IsValid() && !r.Gw.Equal(gw.AsSlice()) {
					nr := r
					nr.Gw = net.IP(gw.AsSlice())
					if err := u.h.RouteReplace(&nr); err != nil {
						return fmt.Errorf("follow the gateway of %s to %s: %w", up.Interface, gw, err)
					}
					u.routes[i] = nr
					u.log.Info("uplink route follows its interface's gateway", "table", r.Table, "gateway", gw.String(), "was", r.Gw.String())
				}
				gw = netip.Addr{} // handled
			}
			if gw.IsValid() { // first seen now
				if err := u.route(netlink.Route{LinkIndex: link.Attrs().Index, Gw: net.IP(gw.AsSlice()), Table: int(up.Table),
					Family: family, Protocol: RouteProtocol}); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

func (u *Routing) hasOwnRule(src *net.IPNet, table uint32) bool {
	for _, r := range u.rules {
		if r.Table == int(table) && r.Priority == fromRulePriority && sameNet(r.Src, src) {
			return true
		}
	}
	return false
}
