package packet

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"

	"github.com/rerouted/rerouted/internal/events"
	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/rewrite"
	"github.com/rerouted/rerouted/internal/sockdiag"
)

// The kernel's own decisions (host marks, decided by the table's rules;
// see nftdp's hostmark.go) reach the daemon afterwards, as a copy of the
// flow's first packet logged to its NFLOG group. The Learner enters each
// such flow in the flow table, whose kernel state is in already, so that
// `rerouted flows`, the debug stream, the metrics, the sweeper (which ends
// it with its socket) and a restart's adoption treat it as any other.
//
// It also acts on the one thing the kernel cannot check before it
// decides: a native socket (bound to the uplink's address itself) that
// owns the wire tuple. The kernel lets that socket's packets reach it and
// logs them as taken; the learner moves the translation to a free port,
// and the connection's next SYN goes out on it.

// Learner follows the kernel's decisions. One goroutine owns it; with the
// debug stream on, a second one (Describe) names each new flow's owner, a
// /proc scan that must not hold up the next flow's socket lookup.
type Learner struct {
	s       *Shared
	diag    sockdiag.Sockets
	w       *Worker // Describe's owner lookups
	pending chan learned
}

// learned is a flow to print, with the socket its owner is found by.
type learned struct {
	f    flow.Flow
	sock sockdiag.Socket
}

// NewLearner returns the follower of the kernel's decisions, with sockets
// and owners of its own: it looks each flow's socket up (its cookie, which
// the sweeper follows), and with the debug stream on, its owner.
func NewLearner(s *Shared, diag sockdiag.Sockets, owners Owners) *Learner {
	return &Learner{s: s, diag: diag, w: NewWorker(s, nil, diag, nil, owners), pending: make(chan learned, 4096)}
}

// Describe prints the [NEW] line of each flow learned, with its owner,
// until Close.
func (l *Learner) Describe() {
	for p := range l.pending {
		l.w.owner.reset(&p.sock)
		l.w.describeOwner(&p.f)
		l.s.Events.Flow("NEW", &p.f)
	}
}

// Close ends Describe.
func (l *Learner) Close() { close(l.pending) }

// Decided enters a flow the kernel decided: pkt is its first packet as
// the socket sent it (up to the log's snap length), mark the host's mark,
// wire the uplink address the kernel gave it.
func (l *Learner) Decided(pkt []byte, mark, uid uint32, wire netip.Addr) {
	s := l.s
	var t rewrite.Packet
	if err := rewrite.Parse(pkt, &t); err != nil {
		s.Stats.Errors[ErrLearn].Add(1)
		s.Log.Error("a flow the kernel decided: unreadable log record", "err", err)
		return
	}
	now := time.Now()
	f := &flow.Flow{Key: flow.Key{Proto: t.Proto, Src: t.Src, Dst: t.Dst}, NewSrc: netip.AddrPortFrom(wire, t.Src.Port()),
		Mark: mark, Rule: "host mark", UID: uid, Start: now, UsedAt: now, Kernel: true}
	if st, ok := s.Uplinks.Get(mark, wire.Is6()); ok {
		f.Dev = st.Dev
		f.MSS = MSS(st.MTU, wire.Is6())
	}
	// The socket: its cookie is what the sweeper follows. One gone
	// already (or a raw socket's SYN) is followed by its tuple: the
	// sweeper ends its flow.
	var sock sockdiag.Socket
	gone := false
	if t.Proto == ipproto.TCP || t.Proto == ipproto.UDP {
		so, err := l.diag.Lookup(t.Proto, t.Src, t.Dst)
		switch {
		case err == nil:
			sock = so
			f.Cookie, f.Inode, f.UID = so.Cookie, so.Inode, so.UID
		case errors.Is(err, sockdiag.ErrNotFound) && t.Proto == ipproto.TCP && s.ClosedTCP.Has(ClosedKey(t.Src.Port(), t.Dst.Addr())):
			// The socket's end was announced: a short connection,
			// over before the daemon looked. Its elements must not
			// wait for idleness: a new socket on the tuple (its port
			// comes round again) would be sent to the daemon. (The
			// key is loose, source port and destination address, as
			// a reset socket's announcement names no more; no socket
			// owns the tuple, which is what matters here.)
			gone = true
			s.Stats.TCPClosed.Add(1)
		case errors.Is(err, sockdiag.ErrNotFound) && t.Proto == ipproto.TCP:
			// No TCP socket owns the SYN: a raw socket's (traceroute
			// -T, a SYN scan), gone as soon as its answer came, or a
			// socket whose end is still on its way (the watcher of TCP
			// sockets' ends then ends the flow). With nothing to
			// follow, it ends by idleness, as the daemon's raw SYNs do
			// (and a new socket on the tuple is the daemon's: a cookie
			// differs).
			f.Kernel = false
			s.Stats.RawSYNs.Add(1)
		case errors.Is(err, sockdiag.ErrNotFound):
			// The UDP socket closed already: nothing to keep its
			// elements for, and a new socket on the tuple must be
			// decided afresh.
			gone = true
		default:
			s.Stats.Errors[ErrSocketLookup].Add(1)
			s.Log.Error("socket lookup", "proto", t.Proto.String(), "src", t.Src, "dst", t.Dst, "err", err)
		}
	}
	if !s.Install.Adopt(f) {
		// The daemon knows the tuple already: it decided it itself
		// (the kernel's rule ran before its elements went in), or an
		// earlier run's adoption found it.
		if g := s.Install.Table().Get(f.Key); g != nil && g.NewSrc == f.NewSrc && g.Mark == f.Mark {
			return
		}
		s.Stats.Errors[ErrLearn].Add(1)
		s.Log.Error("a flow the kernel decided collides with one the daemon knows; its socket will retry on the next SYN",
			"proto", t.Proto.String(), "src", t.Src, "dst", t.Dst, "new_src", f.NewSrc)
		return
	}
	s.Stats.KernelDecided.Add(1)
	switch {
	case !s.Events.On(events.New):
	case gone:
		s.Events.Flow("NEW", f) // no owner to name, and its DESTROY follows
	default:
		select {
		case l.pending <- learned{f: *f, sock: sock}:
		default:
			s.Events.Flow("NEW", f) // Describe is behind: without the owner
		}
	}
	// Its socket closed before the daemon looked, or its end was
	// announced while the daemon looked: its elements must not wait for
	// idleness, a new socket on the tuple would take them over. (A TCP
	// socket's tuple may have passed to a TIME_WAIT socket, which keeps
	// them: the sweep ends those.)
	if !gone && f.Cookie != 0 && s.Closed.Has(f.Cookie) && (f.Proto == ipproto.UDP || l.tupleFree(f)) {
		gone = true
		if f.Proto == ipproto.TCP {
			s.Stats.TCPClosed.Add(1)
		}
	}
	if gone {
		if s.debug() {
			s.Log.Debug("socket closed before the kernel's decision was learned", "proto", f.Proto.String(), "src", f.Src, "dst", f.Dst)
		}
		if f.Proto == ipproto.TCP {
			s.ForgetSoon(f) // a new socket on its port is seconds away
		} else {
			s.Forget(f) // a new UDP socket may take the tuple at once
		}
	}
}

// tupleFree reports whether no socket owns f's socket tuple any more.
func (l *Learner) tupleFree(f *flow.Flow) bool {
	_, err := l.diag.Lookup(f.Proto, f.Src, f.Dst)
	return errors.Is(err, sockdiag.ErrNotFound)
}

// Taken moves the translation whose wire tuple a native socket owns to a
// free port. pkt is a reply (up to the log's snap length) the kernel gave
// to that socket instead of translating it.
func (l *Learner) Taken(pkt []byte) {
	s := l.s
	var t rewrite.Packet
	if err := rewrite.Parse(pkt, &t); err != nil {
		s.Stats.Errors[ErrLearn].Add(1)
		s.Log.Error("a reply a native socket took: unreadable log record", "err", err)
		return
	}
	f := s.Install.Table().ByWire(flow.Key{Proto: t.Proto, Src: t.Dst, Dst: t.Src})
	if f == nil || f.Pass {
		return // moved already
	}
	g := *f
	g.Kernel, g.Seq = false, 0
	if f.Proto == ipproto.TCP {
		if so, err := l.diag.Lookup(ipproto.TCP, f.Src, f.Dst); err == nil {
			g.Cookie, g.Inode = so.Cookie, so.Inode
		}
	}
	s.Install.Remove(f)
	span := uint32(s.PortHi-s.PortLo) + 1
	for try := 0; try < 64; try++ {
		c := netip.AddrPortFrom(f.NewSrc.Addr(), s.PortLo+uint16(rand.Uint32N(span)))
		so, err := l.diag.Lookup(f.Proto, c, f.Dst)
		if err != nil && !errors.Is(err, sockdiag.ErrNotFound) {
			s.Stats.Errors[ErrSocketLookup].Add(1)
			s.Log.Error("socket lookup: is the new source port free?", "proto", f.Proto.String(), "src", c, "dst", f.Dst, "err", err)
			break
		}
		if err == nil && so.Cookie != g.Cookie {
			continue
		}
		h := g
		if s.Install.Add(&h, c) {
			s.Install.Flush()
			s.Stats.Moved.Add(1)
			s.Log.Warn("a native socket owns a translation's wire tuple; the translation moved to another port",
				"proto", f.Proto.String(), "src", f.Src, "dst", f.Dst, "taken", f.NewSrc, "new_src", c)
			return
		}
	}
	s.Install.Flush()
	s.Stats.Errors[ErrNoPort].Add(1)
	s.Log.Error("a native socket owns a translation's wire tuple, and no free port was found: the translation ended",
		"proto", f.Proto.String(), "src", f.Src, "dst", f.Dst, "taken", f.NewSrc)
	s.Events.Flow("DESTROY", f)
}

// Closed remembers the last closedKept sockets whose end the kernel
// announced (by cookie, or by tuple): the learner of the kernel's
// decisions may look a flow's socket up just before its end is announced
// and enter the flow just after, or find no socket because its end is
// already on its way.
type Closed[K comparable] struct {
	mu   sync.Mutex
	ring [closedKept]K
	next int
	n    int
	set  map[K]int // how many times each key is in ring
}

const closedKept = 4096

// Add remembers a closed socket's key.
func (c *Closed[K]) Add(k K) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.set == nil {
		c.set = make(map[K]int, closedKept)
	}
	if c.n == closedKept {
		old := c.ring[c.next]
		if c.set[old]--; c.set[old] <= 0 {
			delete(c.set, old)
		}
	} else {
		c.n++
	}
	c.ring[c.next] = k
	c.set[k]++
	c.next = (c.next + 1) % closedKept
}

// Has reports whether a socket's end was announced lately.
func (c *Closed[K]) Has(k K) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.set[k]
	return ok
}

// ClosedKey is the key ClosedTCP keeps a TCP socket's end by: its source
// port and destination address, what every announcement names.
func ClosedKey(sport uint16, dst netip.Addr) flow.Key {
	return flow.Key{Proto: ipproto.TCP, Src: netip.AddrPortFrom(netip.Addr{}, sport), Dst: netip.AddrPortFrom(dst.Unmap(), 0)}
}

// MSS is the largest MSS a SYN may announce on a route of mtu.
func MSS(mtu int, v6 bool) uint16 {
	headers := tcpIPv4Headers
	if v6 {
		headers = tcpIPv6Headers
	}
	if mtu <= headers {
		return 0
	}
	return uint16(min(mtu-headers, 0xffff))
}
