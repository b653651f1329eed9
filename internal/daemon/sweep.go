package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/nftdp"
	"github.com/rerouted/rerouted/internal/packet"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"golang.org/x/sys/unix"
)

// The flows' end: the sweeper, which follows sockets and idleness; the
// watcher of UDP sockets' ends; and adoption of an earlier run's flows.
// They are given the kernel as two interfaces (sockdiag.Sockets, and
// flowMaps below for the datapath), so that their tests run without root.

// flowMaps is what they ask of the datapath's flow maps (nftdp.Datapath).
type flowMaps interface {
	Entries() ([]nftdp.Entry, error)
	Delete(entries ...nftdp.Entry) error
	Uses() ([]nftdp.Use, error)
	OverBudget() (map[uint32]uint64, error)
}

// sweeper ends the flows whose socket is gone and those idle for the idle
// timeout, reads the maps again when records of the kernel's decisions
// were lost, and reports users over their budget. One goroutine runs it
// (run), after it adopted an earlier run's flows (adopt); it owns its
// sock_diag socket and what it remembers between sweeps.
type sweeper struct {
	d        *Daemon
	diag     sockdiag.Sockets
	maps     flowMaps
	udp      map[uint64]struct{}     // cookies of live UDP sockets, reused
	suspects map[*flow.Flow]struct{} // flows whose socket the last sweep found gone
	overSeen map[uint32]uint64       // each uid's over-budget count last reported
}

func newSweeper(d *Daemon, diag sockdiag.Sockets, maps flowMaps) *sweeper {
	return &sweeper{d: d, diag: diag, maps: maps, udp: map[uint64]struct{}{}, overSeen: map[uint32]uint64{}}
}

// adopt takes over the flows whose elements an earlier run left in the
// table: each keeps its translation while its socket lives (TCP and UDP,
// found again by sock_diag) or, with no socket to follow, until idle.
// Elements whose socket is gone are removed.
func (sw *sweeper) adopt(rt packet.Routes) error {
	d, diag := sw.d, sw.diag
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
		if !d.inst().Adopt(f) {
			gone = append(gone, e) // two elements claim one tuple: keep the first
			continue
		}
		adopted++
		if !f.Pass {
			d.shared.Events.Flow("ADOPT", f)
		}
	}
	if len(gone) > 0 {
		if err := sw.maps.Delete(gone...); err != nil {
			return fmt.Errorf("adopt flows: remove %d whose socket is gone: %w", len(gone), err)
		}
	}
	d.log.Info("adopted the flows an earlier run left", "flows", adopted, "removed", len(gone))
	return nil
}

// watchUDPCloses ends the flows of each UDP socket the kernel destroys,
// until closing is set and the subscription closed.
func (d *Daemon) watchUDPCloses(w *sockdiag.Destroyed, closing *atomic.Bool) {
	ended := func(s *sockdiag.Socket) {
		d.shared.Closed.Add(s.Cookie)
		for _, f := range d.flows().ByCookie(s.Cookie) {
			d.udpClosed.Add(1)
			d.log.Debug("socket closed", "proto", "udp", "src", f.Src, "dst", f.Dst, "cookie", f.Cookie)
			d.shared.Forget(f)
		}
	}
	for {
		err := w.Receive(ended)
		if err != nil && (closing.Load() || d.closesFailed("UDP", errUDPCloseEvents, err)) {
			return
		}
	}
}

// closesFailed counts and logs an error reading the announcements of
// proto sockets' ends, and reports whether reading them has stopped (all
// but a lost batch stop it).
func (d *Daemon) closesFailed(proto string, kind errKind, err error) bool {
	d.errors[kind].Add(1)
	if errors.Is(err, sockdiag.ErrLost) {
		d.log.Warn(proto+" socket ends were lost (too many at once); the sweep ends their flows", "err", err)
		return false
	}
	d.log.Error(proto+" socket ends: no longer received; the sweep ends their flows", "err", err)
	return true
}

// watchTCPCloses ends the flows of each TCP socket the kernel destroys,
// unless a TIME_WAIT socket took its tuple over (the sweep ends those),
// until closing is set. It reads the announcements every tcpClosesEvery:
// a flow's elements need not go the instant its socket does (a new socket
// on the tuple is told apart by its cookie at its SYN), and the kernel
// wakes no reader per announcement. A flow the kernel decided whose socket
// was gone before the daemon learned it has no cookie: it is found by its
// tuple, and the learner finds the recent ends in ClosedTCP when the
// announcement came first.
func (d *Daemon) watchTCPCloses(p *sockdiag.Polled, diag sockdiag.Sockets, closing *atomic.Bool) {
	ended := func(s *sockdiag.Socket) { d.tcpEnded(s, diag) }
	for !closing.Load() {
		if err := p.Drain(ended); err != nil && d.closesFailed("TCP", errTCPCloseEvents, err) {
			return
		}
		time.Sleep(tcpClosesEvery)
	}
}

// tcpClosesEvery is how often the announcements of TCP sockets' ends are
// read.
const tcpClosesEvery = 10 * time.Millisecond

// tcpEnded ends the flow of the TCP socket s, whose end the kernel
// announced, if no socket owns its tuple now. A socket that ended with a
// reset (SO_LINGER 0) is announced without its source address and
// destination port (tcp_disconnect clears them): only its cookie names it,
// which the table does not index for TCP, so the sweep ends its flow.
func (d *Daemon) tcpEnded(s *sockdiag.Socket, diag sockdiag.Sockets) {
	d.shared.Closed.Add(s.Cookie)
	d.shared.ClosedTCP.Add(packet.ClosedKey(s.Local.Port(), s.Remote.Addr()))
	if s.Remote.Port() == 0 {
		return
	}
	f := d.flows().Get(flow.Key{Proto: ipproto.TCP, Src: unmap(s.Local), Dst: unmap(s.Remote)})
	if f == nil || (f.Cookie != s.Cookie && f.Cookie != 0) {
		return // no flow, or a new socket's on the tuple
	}
	so, err := diag.Lookup(ipproto.TCP, f.Src, f.Dst)
	switch {
	case err == nil:
		return // TIME_WAIT, or a new socket: the sweep decides
	case !errors.Is(err, sockdiag.ErrNotFound):
		d.shared.Stats.Errors[packet.ErrSocketLookup].Add(1)
		d.log.Error("socket lookup after its end was announced", "src", f.Src, "dst", f.Dst, "err", err)
		return
	}
	d.shared.Stats.TCPClosed.Add(1)
	d.log.Debug("socket closed", "proto", "tcp", "src", f.Src, "dst", f.Dst, "cookie", f.Cookie, "found_cookie", so.Cookie)
	d.shared.ForgetSoon(f)
}

// watchTCP starts watchTCPCloses, with its own sock_diag socket for the
// lookups, until the daemon closes.
func (d *Daemon) watchTCP() error {
	closes, err := sockdiag.PollTCPDestroyed()
	if err != nil {
		return err
	}
	diag, err := sockdiag.Open()
	if err != nil {
		closes.Close()
		return err
	}
	var closing atomic.Bool
	watched := make(chan struct{})
	go func() { defer close(watched); d.watchTCPCloses(closes, diag, &closing) }()
	d.atClose(func() error {
		closing.Store(true)
		<-watched
		return errors.Join(closes.Close(), diag.Close())
	})
	return nil
}

func unmap(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }

// run removes flows whose socket is gone, and UDP and echo flows
// that have been idle for the idle timeout. A dump (not destroy
// notifications) is what shows TIME_WAIT sockets, which still own their
// tuple.
func (sw *sweeper) run(ctx context.Context) {
	d := sw.d
	every := d.cfg.Load().Daemon.GCInterval
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
		if d.resync.Swap(false) {
			d.resyncKernel(sw.maps)
		}
		if d.flows().Len() == 0 {
			continue
		}
		sw.sweep()
		d.balance.Expire(time.Now())
		sw.reportOverBudget()
		// Idleness is read from the kernel's packet counters, a listing of
		// every UDP and echo element: often enough to end flows within an
		// eighth of the timeout of it, and at most a tenth of the time (the
		// kernel lists 100,000 elements in ~3 s; new flows do not wait for
		// it, the sweeps do).
		idle := d.cfg.Load().Daemon.IdleTimeout
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
func (sw *sweeper) sweep() {
	d, diag, udp := sw.d, sw.diag, sw.udp
	s := d.flows().BeginSweep(time.Now())
	clear(udp)
	tcp := func(so *sockdiag.Socket) {
		s.Seen(flow.Key{Proto: ipproto.TCP, Src: so.Local, Dst: so.Remote}, so.Cookie)
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
		d.errors[errSweep].Add(1)
		d.log.Error("socket dump failed; no flow removed this round", "err", err)
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
	for _, f := range s.End() {
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
			d.shared.Stats.Errors[packet.ErrSocketLookup].Add(1)
			d.log.Error("socket lookup", "src", f.Src, "dst", f.Dst, "err", err)
			continue
		}
		if _, again := sw.suspects[f]; !again {
			suspects[f] = struct{}{}
			continue
		}
		d.log.Debug("socket gone", "proto", f.Proto.String(), "src", f.Src, "dst", f.Dst, "cookie", f.Cookie,
			"lookup", lookupResult(err), "found_cookie", so.Cookie, "found_state", sockdiag.StateName(so.State))
		d.shared.Forget(f)
	}
}

// expireIdle ends the UDP and echo flows none of whose elements counted a
// packet for the idle timeout. With the userspace datapath the selector
// sets count them.
func (sw *sweeper) expireIdle(now time.Time, timeout time.Duration) {
	d := sw.d
	uses, err := sw.maps.Uses()
	if err != nil {
		d.errors[errSweep].Add(1)
		d.log.Error("read flow packet counters; no flow ended by idleness this round", "err", err)
		return
	}
	total := make(map[*flow.Flow]uint64, len(uses))
	for _, u := range uses {
		var f *flow.Flow
		if u.Reply {
			f = d.flows().ByWire(flow.Key{Proto: u.Proto, Src: u.Src, Dst: u.Dst})
		} else {
			f = d.flows().Get(flow.Key{Proto: u.Proto, Src: u.Src, Dst: u.Dst})
		}
		if f != nil {
			total[f] += u.Packets
		}
	}
	for _, f := range d.flows().Snapshot() {
		if !f.Idles() {
			continue
		}
		if n := total[f]; n != f.Used {
			f.Used, f.UsedAt = n, now
			continue
		}
		if now.Sub(f.UsedAt) >= timeout {
			d.idle.Add(1)
			d.log.Debug("flow idle", "proto", f.Proto.String(), "src", f.Src, "dst", f.Dst, "pass", f.Pass, "idle", now.Sub(f.UsedAt).Round(time.Second))
			d.shared.Forget(f)
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
func (sw *sweeper) reportOverBudget() {
	d := sw.d
	over, err := sw.maps.OverBudget()
	if err != nil {
		d.errors[errSweep].Add(1)
		d.log.Error("read the per-user budget's counts", "err", err)
		return
	}
	how := "sent to the overflow queue (served after the others; dropped while it is full, and their sockets retry)"
	for uid, n := range over {
		if n > sw.overSeen[uid] {
			d.log.Warn("a user opened new flows faster than its budget; the rest were "+how, "uid", uid,
				"over_budget", n-sw.overSeen[uid], "total", n, "budget_per_second", d.cfg.Load().Daemon.NewFlowsPerUID)
			sw.overSeen[uid] = n
		}
	}
}
