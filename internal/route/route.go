// Package route answers, for a packet worker, which route and source
// address a marked flow gets (`ip route get DST mark M uid U`), from a cache
// that a routing change empties; and watches the routing for those changes.
package route

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	mdnetlink "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Route is what the kernel's routing says about a marked flow.
type Route struct {
	Src    netip.Addr // preferred source of the marked route
	Dev    string
	DevIdx int
	MTU    int // path MTU: the route's if it has one, else the device's
}

// A Cache resolves routes over one rtnetlink socket and caches the answers
// until the routing changes. Each packet worker owns one; it is not safe
// for concurrent use.
type Cache struct {
	h       *netlink.Handle
	changes *atomic.Uint64 // bumped by Watch on every change
	gen     uint64         // the value of changes the caches belong to
	cache   map[routeKey]Route
	links   map[int]Link
}

type routeKey struct {
	dst    netip.Addr
	mark   uint32
	uid    uint32
	hasUID bool
}

// Link is a network device's name and MTU.
type Link struct {
	Name string
	MTU  int
}

// maxRoutes bounds the route cache (one entry per destination and mark).
const maxRoutes = 1 << 16

// NewCache opens a Cache's rtnetlink socket. Its answers are dropped
// whenever changes moves (Watch moves it).
func NewCache(changes *atomic.Uint64) (*Cache, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("rtnetlink socket: %w", err)
	}
	return &Cache{h: h, changes: changes, cache: map[routeKey]Route{}, links: map[int]Link{}}, nil
}

// Close closes the Cache's socket.
func (r *Cache) Close() { r.h.Close() }

// fresh drops the caches if the routing changed since they were filled.
func (r *Cache) fresh() {
	if g := r.changes.Load(); g != r.gen {
		clear(r.cache)
		clear(r.links)
		r.gen = g
	}
}

// Lookup asks which route and source a packet to dst with mark (and owned
// by uid) gets: `ip route get DST mark M uid U`.
func (r *Cache) Lookup(dst netip.Addr, mark uint32, uid uint32, hasUID bool) (Route, error) {
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
		return Route{}, fmt.Errorf("route get %s mark %d: %w", dst, mark, err)
	}
	if len(rs) == 0 {
		return Route{}, fmt.Errorf("route get %s mark %d: no route", dst, mark)
	}
	src, ok := netip.AddrFromSlice(rs[0].Src)
	if !ok {
		return Route{}, fmt.Errorf("route get %s mark %d: the route has no source address", dst, mark)
	}
	out := Route{Src: src.Unmap(), DevIdx: rs[0].LinkIndex, MTU: rs[0].MTU}
	li, err := r.Link(rs[0].LinkIndex)
	if err != nil {
		return Route{}, err
	}
	out.Dev = li.Name
	if out.MTU == 0 {
		out.MTU = li.MTU
	}
	if len(r.cache) >= maxRoutes {
		clear(r.cache)
	}
	r.cache[k] = out
	return out, nil
}

// Link returns the name and MTU of the device with index idx.
func (r *Cache) Link(idx int) (Link, error) {
	r.fresh()
	if li, ok := r.links[idx]; ok {
		return li, nil
	}
	l, err := r.h.LinkByIndex(idx)
	if err != nil {
		return Link{}, fmt.Errorf("link %d: %w", idx, err)
	}
	li := Link{Name: l.Attrs().Name, MTU: l.Attrs().MTU}
	r.links[idx] = li
	return li, nil
}

// routingGroups are the rtnetlink multicast groups whose messages can change
// a route lookup's answer: links (MTU, state), addresses, routes and rules.
const routingGroups = unix.RTMGRP_LINK | unix.RTMGRP_IPV4_IFADDR | unix.RTMGRP_IPV4_ROUTE | unix.RTMGRP_IPV4_RULE |
	unix.RTMGRP_IPV6_IFADDR | unix.RTMGRP_IPV6_ROUTE | 1<<(unix.RTNLGRP_IPV6_RULE-1)

// Watch subscribes to routing changes and, until ctx is done, bumps
// changes for every datagram of them, and for lost ones (ENOBUFS) too, and
// signals kick (without blocking). It returns once subscribed, so that no
// change after it returns is missed. A cold path: it uses mdlayher/netlink's
// ordinary receive, which waits on the runtime's poller until a change
// comes or ctx ends.
func Watch(ctx context.Context, changes *atomic.Uint64, kick chan<- struct{}) (done <-chan struct{}, err error) {
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
