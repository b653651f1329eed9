// Package flow is rerouted's table of translated flows: one entry per local
// socket whose packets leave with another source, indexed both by the socket's
// own tuple and by the tuple the wire sees, so that a new translation never
// reuses a tuple that is already on the wire.
//
// Entries live exactly as long as their socket, TIME_WAIT included: the daemon
// sweeps the table against sock_diag dumps.
package flow

import (
	"net/netip"
	"sort"
	"sync"
	"time"
)

// Key is a connection as one end sees it. Proto is an IP protocol number.
type Key struct {
	Proto    uint8
	Src, Dst netip.AddrPort
}

// Flow is one translated socket.
type Flow struct {
	Key                   // the socket's own tuple (conntrack's ORIGINAL)
	NewSrc netip.AddrPort // the source the wire sees
	Mark   uint32         // fwmark that routes it out its uplink
	MSS    uint16         // largest MSS a SYN may announce on the new route
	Dev    string         // the uplink's interface
	Rule   string         // what decided the mark
	UID    uint32
	PID    int // owning process when it was translated; 0 if unknown
	Comm   string
	Exe    string
	Cgroup string // cgroup v2 path below the mount, "/" for the root; "" if unknown
	Cookie uint64 // sock_diag cookie: tells a socket from a later one reusing its tuple
	Inode  uint32
	Start  time.Time
	Seq    uint64 // the kernel change that installs it; set before Reserve, never after

	seen uint64 // sweep generation in which its socket was last seen
}

// Wire is the tuple the wire sees for outbound packets.
func (f *Flow) Wire() Key { return Key{Proto: f.Proto, Src: f.NewSrc, Dst: f.Dst} }

// Table is safe for concurrent use.
type Table struct {
	mu     sync.Mutex
	bySock map[Key]*Flow
	byWire map[Key]*Flow
	gen    uint64
}

// NewTable returns an empty table.
func NewTable() *Table {
	return &Table{bySock: map[Key]*Flow{}, byWire: map[Key]*Flow{}}
}

// Get returns the flow of a socket tuple, or nil.
func (t *Table) Get(k Key) *Flow {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.bySock[k]
}

// OnWire reports whether a translation already puts k on the wire.
func (t *Table) OnWire(k Key) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	_, ok := t.byWire[k]
	return ok
}

// ByWire returns the flow whose translation puts k on the wire, or nil.
func (t *Table) ByWire(k Key) *Flow {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.byWire[k]
}

// Reserve adds f unless its socket tuple or its wire tuple is taken.
func (t *Table) Reserve(f *Flow) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.bySock[f.Key] != nil || t.byWire[f.Wire()] != nil {
		return false
	}
	f.seen = t.gen
	t.bySock[f.Key] = f
	t.byWire[f.Wire()] = f
	return true
}

// Insert adds f. A flow with the same socket tuple must have been removed.
func (t *Table) Insert(f *Flow) {
	t.mu.Lock()
	defer t.mu.Unlock()
	f.seen = t.gen
	t.bySock[f.Key] = f
	t.byWire[f.Wire()] = f
}

// Remove deletes f and reports whether it was still in the table.
func (t *Table) Remove(f *Flow) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.remove(f)
}

func (t *Table) remove(f *Flow) bool {
	if t.bySock[f.Key] != f {
		return false
	}
	delete(t.bySock, f.Key)
	if t.byWire[f.Wire()] == f {
		delete(t.byWire, f.Wire())
	}
	return true
}

// Len returns the number of flows.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.bySock)
}

// Snapshot returns copies of all flows, oldest first.
func (t *Table) Snapshot() []Flow {
	t.mu.Lock()
	out := make([]Flow, 0, len(t.bySock))
	for _, f := range t.bySock {
		out = append(out, *f)
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
	if f := s.t.bySock[k]; f != nil && f.Cookie == cookie {
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
