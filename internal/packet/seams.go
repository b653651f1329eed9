package packet

import (
	"context"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rerouted/rerouted/internal/events"
	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/route"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/uplink"
)

// What a Worker is given. The daemon gives it a queue, sock_diag
// (sockdiag.Sockets) and rtnetlink sockets and a /proc scanner; the tests give it fakes, so the
// path's decisions run without root. Each method returns values, not
// pointers, so that nothing the path passes escapes to the heap.

// Verdicts sends a queued packet's verdict (queue.Queue).
type Verdicts interface {
	Accept(id uint32) error
	// AcceptModified sends pkt, rewritten, with mark.
	AcceptModified(id, mark uint32, pkt []byte) error
	// AcceptPacket sends pkt, rewritten, with the packet's own mark.
	AcceptPacket(id uint32, pkt []byte) error
	Drop(id uint32) error
}

// Routes resolves routes as the kernel would (route.Cache).
type Routes interface {
	Lookup(dst netip.Addr, mark, uid uint32, hasUID bool) (route.Route, error)
	Link(idx int) (route.Link, error)
}

// Owners finds a socket's process and cgroup (owner.Owners).
type Owners interface {
	Process(inode, uid uint32, cg uint64) (owner.Process, bool)
	Cgroup(id uint64) (string, bool)
	// HasRawSocket reports whether uid has a raw socket of the family.
	HasRawSocket(v6 bool, uid uint32) (bool, error)
}

// Shared is the state every worker shares with the daemon's other
// goroutines.
type Shared struct {
	Config  *atomic.Pointer[policy.Config] // swapped whole on reload
	Install *flow.Installer                // its Table is read anywhere, written only through it
	Uplinks *uplink.States
	Balance *uplink.Balancer
	Events  *events.Writer // nil: no debug stream
	Log     *slog.Logger
	Stats   *Stats

	Decisions *prometheus.CounterVec // by rule
	Latency   prometheus.Histogram   // first packet in, verdict decided

	// Kernel: the host marks the kernel decides itself, of uplinks that
	// are up; published by the daemon.
	Kernel atomic.Pointer[KernelDecisions]

	logs limiter // per-packet log lines (logf)

	// Closed: the cookies of UDP sockets whose end the kernel announced
	// lately (the daemon's watcher adds them), for a flow learned while
	// its socket's end was on its way. ClosedTCP: the TCP sockets
	// whose end was announced lately (ClosedKey), for a flow learned
	// after its socket was gone.
	Closed    Closed[uint64]
	ClosedTCP Closed[flow.Key]

	PortLo, PortHi uint16 // the ephemeral ports new source ports are drawn from
	Userspace      bool   // every packet of a translated flow comes to the workers
	FailClosed     bool   // on_failure = "closed"
}

// NewWorker returns the packet path of one queue.
func NewWorker(s *Shared, q Verdicts, diag sockdiag.Sockets, routes Routes, owners Owners) *Worker {
	w := &Worker{s: s, q: q, diag: diag, routes: routes}
	w.owner.owners = owners
	return w
}

// debug reports whether debug lines are logged: the path builds their
// arguments only then, since building them allocates.
func (s *Shared) debug() bool { return s.Log.Enabled(context.Background(), slog.LevelDebug) }

// logf logs a line about one packet at level, within linesPerSecond: a
// flood is counted (every such event has its metric), and the next line
// logged says how many were not.
func (s *Shared) logf(level slog.Level, msg string, args ...any) {
	ok, suppressed := s.logs.allow(time.Now().UnixNano())
	if !ok {
		return
	}
	if suppressed > 0 {
		args = append(args, "suppressed_before", suppressed)
	}
	s.Log.Log(context.Background(), level, msg, args...)
}

// kernelDecides reports whether the kernel decides flows with the host's
// mark itself: such a first packet reaches the daemon only as an exception.
func (s *Shared) kernelDecides(mark uint32, v6 bool) bool {
	k := s.Kernel.Load()
	if k == nil || mark == 0 || !s.Config.Load().Daemon.HonorMarks {
		return false
	}
	for _, h := range k.Uplinks {
		if h.Mark == mark && h.Addr.Is6() == v6 {
			return true
		}
	}
	return false
}

// kernelAddr reports whether the kernel gives flows the wire source a.
func (s *Shared) kernelAddr(a netip.Addr) bool {
	if k := s.Kernel.Load(); k != nil {
		for _, h := range k.Uplinks {
			if h.Addr == a {
				return true
			}
		}
	}
	return false
}

// KernelDecisions are the uplinks whose host marks the kernel decides:
// each one's mark and, per family, source address.
type KernelDecisions struct{ Uplinks []KernelUplink }

// KernelUplink is one uplink address whose host mark the kernel decides.
type KernelUplink struct {
	Mark uint32
	Addr netip.Addr
}

// Forget removes a flow from the table and, in order, from the kernel.
func (s *Shared) Forget(f *flow.Flow) {
	if s.Install.Remove(f) && !f.Pass {
		s.Events.Flow("DESTROY", f)
	}
}

// ForgetSoon is Forget for a TCP flow whose socket is gone: its elements
// go with others' (flow.Installer.RemoveSoon).
func (s *Shared) ForgetSoon(f *flow.Flow) {
	if s.Install.RemoveSoon(f) && !f.Pass {
		s.Events.Flow("DESTROY", f)
	}
}
