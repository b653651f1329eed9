// Package flow is rerouted's table of flows: one entry per local socket
// tuple whose packets leave with another source, and for UDP and ICMP echo
// also per tuple decided untranslated (a pass). It is indexed both by the
// socket's own tuple and by the tuple the wire sees, so that a new
// translation never reuses a tuple that is already on the wire.
//
// Entries live as long as their socket, TIME_WAIT included: the daemon
// sweeps the table against sock_diag dumps. UDP and echo flows also end when
// idle; an echo (ping sockets are not in sock_diag) only so.
//
// The table has one writer, the Installer (install.go), which owns the
// ordering rule (explained there).
package flow

import (
	"net/netip"
	"sort"
	"sync"
	"time"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/owner"
)

// Key is a connection as one end sees it. Proto is an IP protocol number;
// an ICMP echo's identifier stands for both ports.
type Key struct {
	Proto    ipproto.Proto
	Src, Dst netip.AddrPort
}

// Flow is one translated socket tuple, or a UDP or echo tuple that passes
// untranslated.
type Flow struct {
	Key                   // the socket's own tuple (conntrack's ORIGINAL)
	Pass   bool           // decided untranslated: NewSrc is Src
	NewSrc netip.AddrPort // the source the wire sees
	Mark   uint32         // fwmark that routes it out its uplink
	MSS    uint16         // largest MSS a SYN may announce on the new route
	Dev    string         // the uplink's interface
	Rule   string         // what decided the mark
	UID    uint32
	Owner  *Owner // who owned the socket when it was translated; nil if not looked up
	Cookie uint64 // sock_diag cookie: tells a socket from a later one reusing its tuple; 0: no socket known
	Inode  uint32
	// Kernel: decided by the kernel's own rules (a host mark), which the
	// daemon learned of afterwards. Its socket is followed by its tuple
	// until the daemon learns the socket's cookie (Cookie 0 meanwhile).
	Kernel bool
	Start  time.Time
	Seq    uint64 // the kernel change that installs it; set before Reserve, never after

	seen uint64 // sweep generation in which its socket was last seen

	// Packets counted by its kernel elements when last read, and when that
	// count last changed: the daemon's sweeper alone touches them.
	Used   uint64
	UsedAt time.Time
}

// Idles reports whether the flow ends by idleness: UDP and echo flows,
// and TCP flows with no socket to follow (a raw socket's SYN).
func (f *Flow) Idles() bool { return f.Proto != ipproto.TCP || (f.Cookie == 0 && !f.Kernel) }

// Owner is the process and cgroup behind a flow's socket, as far as known.
type Owner struct {
	owner.Process        // PID 0 if unknown
	Cgroup        string // cgroup v2 path below the mount, "/" for the root; "" if unknown
}

// Wire is the tuple the wire sees for outbound packets.
func (f *Flow) Wire() Key { return Key{Proto: f.Proto, Src: f.NewSrc, Dst: f.Dst} }

// Table is safe for concurrent use.
type Table struct {
	mu     sync.Mutex
	bySock map[packed]*Flow
	byWire map[packed]*Flow
	// byCookie indexes UDP flows by their socket's cookie: an unconnected
	// socket has a flow per peer, all of which end with it.
	byCookie map[uint64][]*Flow
	gen      uint64
}

// packed is a Key without pointers, for the maps: 40 bytes instead of 72,
// and nothing for the garbage collector to scan (100,000 flows are two
// maps of 100,000 entries).
type packed struct {
	src, dst     [16]byte
	sport, dport uint16
	proto        ipproto.Proto
	v4           bool
}

func pack(k Key) packed {
	return packed{src: k.Src.Addr().As16(), dst: k.Dst.Addr().As16(), sport: k.Src.Port(), dport: k.Dst.Port(),
		proto: k.Proto, v4: k.Src.Addr().Is4()}
}

// newTable returns an empty table. Its installer makes it (NewInstaller):
// flows enter and leave only through that.
func newTable() *Table {
	return &Table{bySock: map[packed]*Flow{}, byWire: map[packed]*Flow{}, byCookie: map[uint64][]*Flow{}}
}

// Get returns the flow of a socket tuple, or nil.
func (t *Table) Get(k Key) *Flow {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.bySock[pack(k)]
}

// OnWire reports whether a translation already puts k on the wire.
func (t *Table) OnWire(k Key) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.byWire[pack(k)]
	return ok
}

// ByWire returns the flow whose translation puts k on the wire, or nil.
func (t *Table) ByWire(k Key) *Flow {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.byWire[pack(k)]
}

// reserve adds f unless its socket tuple or its wire tuple is taken.
// Only the installer calls it (Installer.Add, Adopt).
func (t *Table) reserve(f *Flow) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	ks, kw := pack(f.Key), pack(f.Wire())
	if t.bySock[ks] != nil || t.byWire[kw] != nil {
		return false
	}
	f.seen = t.gen
	t.bySock[ks] = f
	t.byWire[kw] = f
	if f.Proto == ipproto.UDP && f.Cookie != 0 {
		t.byCookie[f.Cookie] = append(t.byCookie[f.Cookie], f)
	}
	return true
}

// ByCookie returns the UDP flows of the socket with cookie.
func (t *Table) ByCookie(cookie uint64) []*Flow {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]*Flow(nil), t.byCookie[cookie]...)
}

// remove deletes f and reports whether it was still in the table. Only
// the installer calls it (Installer.Remove, and a refused addition).
func (t *Table) remove(f *Flow) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.removeLocked(f)
}

func (t *Table) removeLocked(f *Flow) bool {
	ks, kw := pack(f.Key), pack(f.Wire())
	if t.bySock[ks] != f {
		return false
	}
	delete(t.bySock, ks)
	if t.byWire[kw] == f {
		delete(t.byWire, kw)
	}
	if fs, ok := t.byCookie[f.Cookie]; ok && f.Proto == ipproto.UDP {
		for i, g := range fs {
			if g == f {
				fs[i] = fs[len(fs)-1]
				fs[len(fs)-1] = nil
				fs = fs[:len(fs)-1]
				break
			}
		}
		if len(fs) == 0 {
			delete(t.byCookie, f.Cookie)
		} else {
			t.byCookie[f.Cookie] = fs
		}
	}
	return true
}

// Len returns the number of flows.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.bySock)
}

// Snapshot returns all flows, oldest first. A flow's fields do not change
// once it is in the table, so they may be read without the table's lock.
func (t *Table) Snapshot() []*Flow {
	t.mu.Lock()
	out := make([]*Flow, 0, len(t.bySock))
	for _, f := range t.bySock {
		out = append(out, f)
	}
	t.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Start.Before(out[j].Start) })
	return out
}

// Sweep is one pass of garbage collection against a socket dump.
type Sweep struct {
	t      *Table
	gen    uint64
	cutoff time.Time
}

// BeginSweep starts a pass. Call it before starting the socket dump: flows
// created after this moment are never removed by this pass, as their socket
// may be missing from a dump that had already begun.
func (t *Table) BeginSweep(now time.Time) *Sweep {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.gen++
	return &Sweep{t: t, gen: t.gen, cutoff: now}
}

// Seen records that the socket with tuple k and cookie is alive.
func (s *Sweep) Seen(k Key, cookie uint64) {
	s.t.mu.Lock()
	if f := s.t.bySock[pack(k)]; f != nil && (f.Cookie == cookie || (f.Cookie == 0 && f.Kernel)) {
		f.seen = s.gen
	}
	s.t.mu.Unlock()
}

// End returns the flows whose socket the dump did not show. They are only
// candidates: a netlink dump is not atomic, and a socket that changes while
// the dump runs (FIN_WAIT2 becoming TIME_WAIT, say) can be skipped.
func (s *Sweep) End() []*Flow {
	s.t.mu.Lock()
	defer s.t.mu.Unlock()
	var missing []*Flow
	for _, f := range s.t.bySock {
		if f.seen != s.gen && f.Start.Before(s.cutoff) {
			missing = append(missing, f)
		}
	}
	return missing
}
