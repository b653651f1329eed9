package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"time"

	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/uplink"

	mdnetlink "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// route is what the kernel's routing says about a marked flow.
type route struct {
	Src    netip.Addr // preferred source of the marked route
	Dev    string
	DevIdx int
	MTU    int // path MTU: the route's if it has one, else the device's
}

// router resolves routes over one rtnetlink socket and caches the answers
// until the routing changes. Each packet worker owns one.
type router struct {
	h       *netlink.Handle
	changes *atomic.Uint64 // bumped by watchRouting on every change
	gen     uint64         // the value of changes the caches belong to
	cache   map[routeKey]route
	links   map[int]linkInfo
}

type routeKey struct {
	dst    netip.Addr
	mark   uint32
	uid    uint32
	hasUID bool
}

type linkInfo struct {
	name string
	mtu  int
}

// maxRoutes bounds the route cache (one entry per destination and mark).
const maxRoutes = 1 << 16

func newRouter(changes *atomic.Uint64) (*router, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("rtnetlink socket: %w", err)
	}
	return &router{h: h, changes: changes, cache: map[routeKey]route{}, links: map[int]linkInfo{}}, nil
}

func (r *router) close() { r.h.Close() }

// fresh drops the caches if the routing changed since they were filled.
func (r *router) fresh() {
	if g := r.changes.Load(); g != r.gen {
		clear(r.cache)
		clear(r.links)
		r.gen = g
	}
}

// lookup asks which route and source a packet to dst with mark (and owned
// by uid) gets: `ip route get DST mark M uid U`.
func (r *router) lookup(dst netip.Addr, mark uint32, uid uint32, hasUID bool) (route, error) {
	r.fresh()
	k := routeKey{dst: dst, mark: mark, uid: uid, hasUID: hasUID}
	if rt, ok := r.cache[k]; ok {
		return rt, nil
	}
	opts := &netlink.RouteGetOptions{Mark: mark}
	if hasUID {
		opts.UID = &uid
	}
	rs, err := r.h.RouteGetWithOptions(net.IP(dst.AsSlice()), opts)
	if err != nil {
		return route{}, fmt.Errorf("route get %s mark %d: %w", dst, mark, err)
	}
	if len(rs) == 0 {
		return route{}, fmt.Errorf("route get %s mark %d: no route", dst, mark)
	}
	src, ok := netip.AddrFromSlice(rs[0].Src)
	if !ok {
		return route{}, fmt.Errorf("route get %s mark %d: the route has no source address", dst, mark)
	}
	out := route{Src: src.Unmap(), DevIdx: rs[0].LinkIndex, MTU: rs[0].MTU}
	li, err := r.link(rs[0].LinkIndex)
	if err != nil {
		return route{}, err
	}
	out.Dev = li.name
	if out.MTU == 0 {
		out.MTU = li.mtu
	}
	if len(r.cache) >= maxRoutes {
		clear(r.cache)
	}
	r.cache[k] = out
	return out, nil
}

func (r *router) link(idx int) (linkInfo, error) {
	r.fresh()
	if li, ok := r.links[idx]; ok {
		return li, nil
	}
	l, err := r.h.LinkByIndex(idx)
	if err != nil {
		return linkInfo{}, fmt.Errorf("link %d: %w", idx, err)
	}
	li := linkInfo{name: l.Attrs().Name, mtu: l.Attrs().MTU}
	r.links[idx] = li
	return li, nil
}

// routingGroups are the rtnetlink multicast groups whose messages can change
// a route lookup's answer: links (MTU, state), addresses, routes and rules.
const routingGroups = unix.RTMGRP_LINK | unix.RTMGRP_IPV4_IFADDR | unix.RTMGRP_IPV4_ROUTE | unix.RTMGRP_IPV4_RULE |
	unix.RTMGRP_IPV6_IFADDR | unix.RTMGRP_IPV6_ROUTE | 1<<(unix.RTNLGRP_IPV6_RULE-1)

// watchRouting subscribes to routing changes and, until ctx is done, bumps
// changes for every datagram of them, and for lost ones (ENOBUFS) too, and
// signals kick (without blocking). It returns once subscribed, so that no
// change after it returns is missed. A cold path: it uses mdlayher/netlink's
// ordinary receive, which waits on the runtime's poller until a change
// comes or ctx ends.
func watchRouting(ctx context.Context, changes *atomic.Uint64, kick chan<- struct{}) (done <-chan struct{}, err error) {
	c, err := mdnetlink.Dial(unix.NETLINK_ROUTE, &mdnetlink.Config{Groups: routingGroups})
	if err != nil {
		return nil, fmt.Errorf("rtnetlink notifications: %w", err)
	}
	ch := make(chan struct{})
	go func() {
		defer close(ch)
		defer c.Close()
		// The end of ctx interrupts a receive. Setting a deadline fails
		// only on a closed socket, when this goroutine is gone already.
		stop := context.AfterFunc(ctx, func() { _ = c.SetReadDeadline(time.Unix(1, 0)) })
		defer stop()
		for ctx.Err() == nil {
			_, err := c.Receive()
			switch {
			case err == nil, errors.Is(err, unix.ENOBUFS):
				changes.Add(1)
			case ctx.Err() != nil:
				return
			case errors.Is(err, unix.EINTR):
				continue
			default:
				changes.Add(1)
				time.Sleep(100 * time.Millisecond)
			}
			select {
			case kick <- struct{}{}:
			default:
			}
		}
	}()
	return ch, nil
}

// keepRouting puts back managed uplinks' routes and rules that were
// removed behind rerouted's back, after each burst of routing changes: the
// kernel drops a table's default route when its link goes down, and
// network managers delete rules they do not know. What cannot go back yet
// (a link still down) is tried again at the next change, such as the link
// coming up.
//
// It owns r's socket, diag and rt while it runs.
func (d *Daemon) keepRouting(ctx context.Context, r *uplink.Routing, diag *sockdiag.Conn, rt *router, changed <-chan struct{}) {
	waiting := map[string]bool{} // pending items already logged
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
		// Let a burst (a link going down takes its routes and addresses)
		// settle: one check for all of it.
		select {
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
		select {
		case <-changed:
		default:
		}
		restored, pending, err := r.Ensure()
		if err != nil {
			d.stats.errors[errRepair].Add(1)
			d.log.Error("check managed uplink routing", "err", err)
		}
		for _, what := range restored {
			kind := "route"
			if strings.HasPrefix(what, "rule ") {
				kind = "ip_rule"
			}
			d.metrics.repairs.WithLabelValues(kind).Inc()
			d.log.Warn("managed uplink routing was removed; put it back", "what", what)
			delete(waiting, what)
		}
		now := map[string]bool{}
		for _, p := range pending {
			now[p] = true
			if !waiting[p] {
				d.log.Warn("managed uplink routing is missing and cannot be put back yet; retrying at the next routing change", "what", p)
			}
		}
		waiting = now
		// The states first: new flows choose by them.
		transitions, err := r.UpdateStates(&d.uplinks, d.cfg.Load().Uplinks, time.Now())
		if err != nil {
			d.stats.errors[errRepair].Add(1)
			d.log.Error("read uplink states", "err", err)
		}
		for _, tr := range transitions {
			d.uplinkChanged(tr.Status)
		}
		d.republishSteering()
		d.moveStale(r, diag, rt)
	}
}

// uplinkChanged tells of an uplink's transition: a WARNING, the debug
// stream, the metrics.
func (d *Daemon) uplinkChanged(st uplink.Status) {
	d.metrics.transitions.WithLabelValues(st.Uplink, st.Family).Inc()
	d.events.uplink(st)
	if st.Up {
		d.log.Warn("uplink is up", "uplink", st.Uplink, "family", st.Family)
		return
	}
	d.log.Warn("uplink is down: rules choose their next uplink, host marks their fallback", "uplink", st.Uplink, "family", st.Family, "why", st.Why)
}
