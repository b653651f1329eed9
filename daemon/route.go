package daemon

import (
	"fmt"
	"net"
	"net/netip"
	"time"

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

// router resolves routes over one rtnetlink socket. It is owned by the
// packet goroutine.
type router struct {
	h     *netlink.Handle
	links map[int]linkInfo
}

type linkInfo struct {
	name    string
	mtu     int
	fetched time.Time
}

// linkTTL bounds how stale a cached interface name or MTU can be.
const linkTTL = 5 * time.Second

func newRouter() (*router, error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("rtnetlink socket: %w", err)
	}
	return &router{h: h, links: map[int]linkInfo{}}, nil
}

func (r *router) close() { r.h.Close() }

// lookup asks the kernel which route and source a packet to dst with mark
// (and owned by uid) would get: `ip route get DST mark M uid U`.
func (r *router) lookup(dst netip.Addr, mark uint32, uid uint32, hasUID bool) (route, error) {
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
	return out, nil
}

func (r *router) link(idx int) (linkInfo, error) {
	if li, ok := r.links[idx]; ok && time.Since(li.fetched) < linkTTL {
		return li, nil
	}
	l, err := r.h.LinkByIndex(idx)
	if err != nil {
		return linkInfo{}, fmt.Errorf("link %d: %w", idx, err)
	}
	li := linkInfo{name: l.Attrs().Name, mtu: l.Attrs().MTU, fetched: time.Now()}
	r.links[idx] = li
	return li, nil
}
