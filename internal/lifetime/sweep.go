// Package lifetime ends flows as their sockets do: the sweeper, which
// follows sockets and idleness; the watchers of the kernel's
// announcements of UDP and TCP sockets' ends; adoption of an earlier run's
// flows; and the reading again of the kernel's decisions whose records
// were lost. It is given the kernel as two interfaces (sockdiag.Sockets,
// and Maps for the datapath), so that its tests run without root.
package lifetime

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/nftdp"
	"github.com/rerouted/rerouted/internal/packet"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"golang.org/x/sys/unix"
)

// Maps is what the flows' end asks of the datapath's flow maps
// (nftdp.Datapath).
type Maps interface {
	Entries() ([]nftdp.Entry, error)
	Delete(entries ...nftdp.Entry) error
	Uses() ([]nftdp.Use, error)
	OverBudget() (map[uint32]uint64, error)
}

// Env is what the daemon gives: the state the packet path shares (its
// flow table through the installer, stats, configuration, log, balancer)
// and the daemon's counters of what ended how, and of what failed.
type Env struct {
	Shared    *packet.Shared
	Idle      *atomic.Uint64 // UDP and echo flows ended by idleness
	UDPClosed *atomic.Uint64 // UDP flows ended when the kernel announced their socket's end

	SweepErrors *atomic.Uint64 // a socket dump or counter read failed: nothing removed that round
	UDPEvents   *atomic.Uint64 // the announcements of UDP sockets' ends were lost
	TCPEvents   *atomic.Uint64 // the announcements of TCP sockets' ends were lost
}

func (e *Env) flows() *flow.Table { return e.Shared.Install.Table() }

// Sweeper ends the flows whose socket is gone and those idle for the idle
// timeout, reads the maps again when records of the kernel's decisions
// were lost, and reports users over their budget. One goroutine runs it
// (Run), after it adopted an earlier run's flows (Adopt); it owns its
// sock_diag socket and what it remembers between sweeps.
type Sweeper struct {
	env      Env
	diag     sockdiag.Sockets
	maps     Maps
	resync   atomic.Bool             // records of the kernel's decisions were lost: the next round reads the maps
	udp      map[uint64]struct{}     // cookies of live UDP sockets, reused
	suspects map[*flow.Flow]struct{} // flows whose socket the last sweep found gone
	overSeen map[uint32]uint64       // each uid's over-budget count last reported
}

// New returns the sweeper of env's flows, with diag its own sock_diag
// socket.
func New(env Env, diag sockdiag.Sockets, maps Maps) *Sweeper {
	return &Sweeper{env: env, diag: diag, maps: maps, udp: map[uint64]struct{}{}, overSeen: map[uint32]uint64{}}
}

// Resync asks the next round to enter the flows the kernel decided whose
// records were lost. Any goroutine may call it.
func (sw *Sweeper) Resync() { sw.resync.Store(true) }

// Run removes flows whose socket is gone, and UDP and echo flows that
// have been idle for the idle timeout, until ctx is done. A dump (not
// destroy notifications) is what shows TIME_WAIT sockets, which still own
// their tuple.
func (sw *Sweeper) Run(ctx context.Context) {
	s := sw.env.Shared
	every := s.Config.Load().Daemon.GCInterval
	t := time.NewTicker(every)
	defer t.Stop()
	var lastIdle time.Time
	var listing time.Duration // what the last idle check took
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if sw.resync.Swap(false) {
			sw.resyncKernel()
		}
		if sw.env.flows().Len() == 0 {
			continue
		}
		sw.sweep()
		s.Balance.Expire(time.Now())
		sw.reportOverBudget()
		// Idleness is read from the kernel's packet counters, a listing of
		// every UDP and echo element: often enough to end flows within an
		// eighth of the timeout of it, and at most a tenth of the time (the
		// kernel lists 100,000 elements in ~3 s; new flows do not wait for
		// it, the sweeps do).
		idle := s.Config.Load().Daemon.IdleTimeout
		if now := time.Now(); now.Sub(lastIdle) >= max(every, idle/8, 10*listing) {
			lastIdle = now
			sw.expireIdle(now, idle)
			listing = time.Since(now)
		}
	}
}

// sweep removes the flows whose socket is gone: TCP sockets are matched by
// tuple and cookie, UDP sockets by cookie (an unconnected socket serves
// many tuples). Echo flows, and UDP flows whose socket was never found,
// end by idleness only.
func (sw *Sweeper) sweep() {
	s, diag, udp := sw.env.Shared, sw.diag, sw.udp
	sweep := sw.env.flows().BeginSweep(time.Now())
	clear(udp)
	tcp := func(so *sockdiag.Socket) {
		sweep.Seen(flow.Key{Proto: ipproto.TCP, Src: so.Local, Dst: so.Remote}, so.Cookie)
	}
	dgram := func(so *sockdiag.Socket) { udp[so.Cookie] = struct{}{} }
	var err error
	for _, dump := range []struct {
		family uint8
		proto  ipproto.Proto
		fn     func(*sockdiag.Socket)
	}{
		{unix.AF_INET, ipproto.TCP, tcp}, {unix.AF_INET6, ipproto.TCP, tcp},
		{unix.AF_INET, ipproto.UDP, dgram}, {unix.AF_INET6, ipproto.UDP, dgram},
	} {
		if err = diag.Dump(dump.family, dump.proto, dump.fn); err != nil {
			break
		}
	}
	if err != nil {
		// An incomplete dump must not be taken as "sockets gone".
		sw.env.SweepErrors.Add(1)
		s.Log.Error("socket dump failed; no flow removed this round", "err", err)
		return
	}
	// The dump only nominates: an exact lookup confirms each socket is
	// gone, in two sweeps running, since removing a live socket's
	// translation sends its last packets out with the wrong source. (The
	// early ends once put down to a miss by both, age 100-400 ms with
	// lookup "no such socket", were TIME_WAIT sockets a RST had really
	// ended: the peer's FIN sent again by its tail loss probe, the
	// TIME_WAIT socket's ACK of the copy, the peer's RST from its closed
	// port, which Linux lets end TIME_WAIT unless net.ipv4.tcp_rfc1337 is
	// set. ss did not show them either, and the lookup finds TIME_WAIT
	// and orphaned FIN_WAIT2 sockets alike: both are timewait socks in
	// the established hash, which the exact lookup searches.)
	suspects := make(map[*flow.Flow]struct{}, len(sw.suspects))
	defer func() { sw.suspects = suspects }()
	for _, f := range sweep.End() {
		if f.Cookie == 0 && (!f.Kernel || f.Proto.IsICMP()) {
			continue // no socket to follow: idleness ends it
		}
		if _, ok := udp[f.Cookie]; ok && f.Proto == ipproto.UDP {
			continue
		}
		so, err := diag.Lookup(f.Proto, f.Src, f.Dst)
		switch {
		case err == nil && (so.Cookie == f.Cookie || f.Cookie == 0):
			continue // alive: the dump missed it
		case err != nil && !errors.Is(err, sockdiag.ErrNotFound):
			s.Stats.Errors[packet.ErrSocketLookup].Add(1)
			s.Log.Error("socket lookup", "src", f.Src, "dst", f.Dst, "err", err)
			continue
		}
		if _, again := sw.suspects[f]; !again {
			suspects[f] = struct{}{}
			continue
		}
		s.Log.Debug("socket gone", "proto", f.Proto.String(), "src", f.Src, "dst", f.Dst, "cookie", f.Cookie,
			"lookup", lookupResult(err), "found_cookie", so.Cookie, "found_state", sockdiag.StateName(so.State))
		s.Forget(f)
	}
}

// expireIdle ends the UDP and echo flows none of whose elements counted a
// packet for the idle timeout. With the userspace datapath the selector
// sets count them.
func (sw *Sweeper) expireIdle(now time.Time, timeout time.Duration) {
	s, flows := sw.env.Shared, sw.env.flows()
	uses, err := sw.maps.Uses()
	if err != nil {
		sw.env.SweepErrors.Add(1)
		s.Log.Error("read flow packet counters; no flow ended by idleness this round", "err", err)
		return
	}
	total := make(map[*flow.Flow]uint64, len(uses))
	for _, u := range uses {
		var f *flow.Flow
		if u.Reply {
			f = flows.ByWire(flow.Key{Proto: u.Proto, Src: u.Src, Dst: u.Dst})
		} else {
			f = flows.Get(flow.Key{Proto: u.Proto, Src: u.Src, Dst: u.Dst})
		}
		if f != nil {
			total[f] += u.Packets
		}
	}
	for _, f := range flows.Snapshot() {
		if !f.Idles() {
			continue
		}
		if n := total[f]; n != f.Used {
			f.Used, f.UsedAt = n, now
			continue
		}
		if now.Sub(f.UsedAt) >= timeout {
			sw.env.Idle.Add(1)
			s.Log.Debug("flow idle", "proto", f.Proto.String(), "src", f.Src, "dst", f.Dst, "pass", f.Pass, "idle", now.Sub(f.UsedAt).Round(time.Second))
			s.Forget(f)
		}
	}
}

// lookupResult describes a socket lookup's outcome for a log line.
func lookupResult(err error) string {
	if err == nil {
		return "found"
	}
	return err.Error()
}

// reportOverBudget logs, at WARNING, each user whose new flows went past
// its budget since the last sweep: they failed open (or closed).
func (sw *Sweeper) reportOverBudget() {
	s := sw.env.Shared
	over, err := sw.maps.OverBudget()
	if err != nil {
		sw.env.SweepErrors.Add(1)
		s.Log.Error("read the per-user budget's counts", "err", err)
		return
	}
	how := "sent to the overflow queue (served after the others; dropped while it is full, and their sockets retry)"
	for uid, n := range over {
		if n > sw.overSeen[uid] {
			s.Log.Warn("a user opened new flows faster than its budget; the rest were "+how, "uid", uid,
				"over_budget", n-sw.overSeen[uid], "total", n, "budget_per_second", s.Config.Load().Daemon.NewFlowsPerUID)
			sw.overSeen[uid] = n
		}
	}
}

// resyncKernel enters the flows the kernel decided whose records were
// lost: every flow in the table's maps the daemon does not know.
func (sw *Sweeper) resyncKernel() {
	s := sw.env.Shared
	entries, err := sw.maps.Entries()
	if err != nil {
		sw.env.SweepErrors.Add(1)
		s.Log.Error("read the flows the kernel decided", "err", err)
		sw.Resync()
		return
	}
	now := time.Now()
	n := 0
	for _, e := range entries {
		if e.Pass || sw.env.flows().Get(flow.Key{Proto: e.Proto, Src: e.Src, Dst: e.Dst}) != nil {
			continue
		}
		f := &flow.Flow{Key: flow.Key{Proto: e.Proto, Src: e.Src, Dst: e.Dst}, NewSrc: e.NewSrc, Mark: e.Mark,
			Rule: "host mark", Start: now, UsedAt: now, Kernel: true}
		if s.Install.Adopt(f) {
			s.Stats.KernelDecided.Add(1)
			n++
		}
	}
	s.Log.Info("entered the flows the kernel decided whose records were lost", "flows", n)
}

// Adopt takes over the flows whose elements an earlier run left in the
// table: each keeps its translation while its socket lives (TCP and UDP,
// found again by sock_diag) or, with no socket to follow, until idle.
// Elements whose socket is gone are removed.
func (sw *Sweeper) Adopt(rt packet.Routes) error {
	s, diag := sw.env.Shared, sw.diag
	entries, err := sw.maps.Entries()
	if err != nil {
		return fmt.Errorf("adopt flows: %w", err)
	}
	now := time.Now()
	var gone []nftdp.Entry
	adopted := 0
	for _, e := range entries {
		f := &flow.Flow{Key: flow.Key{Proto: e.Proto, Src: e.Src, Dst: e.Dst}, NewSrc: e.NewSrc, Mark: e.Mark, Pass: e.Pass,
			Rule: "adopted", Start: now, UsedAt: now}
		if e.Proto == ipproto.TCP || e.Proto == ipproto.UDP {
			so, err := diag.Lookup(e.Proto, e.Src, e.Dst)
			if errors.Is(err, sockdiag.ErrNotFound) {
				gone = append(gone, e)
				continue
			}
			if err != nil {
				return fmt.Errorf("adopt flows: socket lookup: %w", err)
			}
			f.Cookie, f.UID, f.Inode = so.Cookie, so.UID, so.Inode
		}
		if !e.Pass {
			if r, err := rt.Lookup(e.Dst.Addr(), e.Mark, f.UID, f.Cookie != 0); err == nil {
				f.Dev = r.Dev
				if li, err := rt.Link(r.DevIdx); f.Dev == "" && err == nil {
					f.Dev = li.Name
				}
			}
		}
		if !s.Install.Adopt(f) {
			gone = append(gone, e) // two elements claim one tuple: keep the first
			continue
		}
		adopted++
		if !f.Pass {
			s.Events.Flow("ADOPT", f)
		}
	}
	if len(gone) > 0 {
		if err := sw.maps.Delete(gone...); err != nil {
			return fmt.Errorf("adopt flows: remove %d whose socket is gone: %w", len(gone), err)
		}
	}
	s.Log.Info("adopted the flows an earlier run left", "flows", adopted, "removed", len(gone))
	return nil
}
