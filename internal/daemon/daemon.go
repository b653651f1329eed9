// Package daemon is rerouted's daemon: it receives the first packet of every
// new locally originated flow (a TCP connection, a UDP or ICMP echo tuple),
// decides its uplink, installs the flow's translation (or, for UDP and
// echo, the decision not to translate) in the kernel, and removes it when
// the socket is gone or the flow idle.
//
// Goroutines and what each owns:
//   - one worker per queue runs the packet path (package packet); it owns
//     its queue socket, a sock_diag socket for exact lookups, and a route
//     cache (route.Cache) with its rtnetlink socket;
//   - the installer (flow.Installer) applies flow changes to the kernel
//     maps, in order, a transaction per burst (install.go has its
//     kernel); the Datapath owns the nftables socket;
//   - the sweeper owns a sock_diag socket for dumps (it adopts an earlier
//     run's flows with it before it starts);
//   - the routing watcher (route.Watch) owns an rtnetlink notification
//     socket; the routing keeper (routing.go) acts on what it sees;
//   - the control server (package control) answers `rerouted flows` and
//     `rerouted uplinks`; the metrics server, /metrics (metrics.go).
//
// Managed uplinks' routes and rules are installed before anything else and
// removed after everything else, on their own rtnetlink socket (package
// uplink).
//
// The installer (flow.Installer) owns the ordering rule: it alone changes
// the flow table, each change and its kernel change one step, so the
// kernel sees them in table order and a flow's elements are in before its
// first packet is released.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"reflect"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rerouted/rerouted/internal/control"
	"github.com/rerouted/rerouted/internal/events"
	"github.com/rerouted/rerouted/internal/filesafety"
	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/instance"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/nftdp"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/packet"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/queue"
	"github.com/rerouted/rerouted/internal/route"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/steer"
	"github.com/rerouted/rerouted/internal/uplink"
	"golang.org/x/sys/unix"
)

// Options configure a daemon run.
type Options struct {
	Config *policy.Config
	Log    *slog.Logger
	Events io.Writer // the debug stream: one line per flow event; nil for none
	// EventKinds selects the debug stream's lines (0: all of them).
	EventKinds events.Kinds
	Reload     <-chan struct{} // each receive reloads the configuration file (SIGHUP)
	// Detach, when it receives, stops the daemon for a restart: it exits
	// leaving its table, its flows' elements and its uplinks' routing in
	// place (translated flows keep working, new ones pass untranslated
	// through the queue's bypass), and the next start adopts them. Run
	// then returns ErrDetached.
	Detach <-chan struct{}
	// Notify, if set, is told the daemon's state in systemd's words:
	// "READY=1" once new flows are translated, "RELOADING=1" and
	// "READY=1" around a reload, "STOPPING=1" when removal begins.
	Notify func(state string)
	// InsecureConfig accepts a configuration file that users other than
	// root can change (--insecure-config); otherwise a reload refuses it,
	// as the start did.
	InsecureConfig bool
}

// Daemon is one running instance.
type Daemon struct {
	cfg     atomic.Pointer[policy.Config] // swapped whole on reload
	log     *slog.Logger
	events  *events.Writer
	steer   *steer.Steering // connect-time steering; nil when off
	dp      *nftdp.Datapath
	flows   *flow.Table     // read anywhere; flows enter and leave only through inst
	uplinks uplink.States   // each uplink's state, per family
	balance uplink.Balancer // balance rules' choices, and the sticky ones kept
	// routingChanged wakes the routing keeper (keepRouting), as a routing
	// change does.
	routingChanged chan<- struct{}
	inst           *flow.Installer
	shared         *packet.Shared // what the packet path shares with the rest
	metrics        *metrics
	suspects       map[*flow.Flow]struct{} // flows whose socket the last sweep found gone (sweeper only)
	overSeen       map[uint32]uint64       // each uid's over-budget count last reported (sweeper only)
	notify         func(state string)
	insecure       bool // InsecureConfig

	userspace      bool          // every packet of a translated flow goes through the workers
	failClosed     bool          // on_failure = "closed"
	routing        atomic.Uint64 // bumped on every routing change: route caches are stale
	portLo, portHi uint16
	stats          packet.Stats
}

// ErrDetached is returned by Run when it stopped for a restart (Detach),
// leaving the kernel state for the next start.
var ErrDetached = errors.New("detached for a restart: translations left in place for the next start")

// Each NFQUEUE socket's buffer: bursts of new connections must not overflow
// it (measured: a large SO_RCVBUFFORCE is what ended the drops), nor, with the
// userspace datapath, bulk transfers' packets of up to 64 KB.
const (
	queueRcvbuf          = 8 << 20
	queueRcvbufUserspace = 64 << 20
)

// Run runs the daemon until ctx is done, then removes everything it
// installed. It returns once the host is back as it found it.
func Run(ctx context.Context, o Options) (err error) {
	cfg := o.Config
	// The heap is mostly long-lived flow state: collect at 50% growth
	// rather than 100%, a little CPU for a third less memory.
	debug.SetGCPercent(50)
	d := &Daemon{log: o.Log, flows: flow.NewTable(), userspace: cfg.Daemon.Datapath == "userspace", notify: o.Notify,
		insecure: o.InsecureConfig, failClosed: cfg.Daemon.FailClosed}
	if d.notify == nil {
		d.notify = func(string) {}
	}
	d.cfg.Store(cfg)
	d.inst = flow.NewInstaller(d.flows, newFlowKernel(d), d.installFailed)
	d.metrics = newMetrics(d)
	if o.Events != nil {
		kinds := o.EventKinds
		if kinds == 0 {
			kinds = events.All
		}
		d.events = events.NewWriter(o.Events, kinds)
	}
	if err := uplink.CheckInterfaces(cfg.Uplinks); err != nil {
		return err
	}
	if d.portLo, d.portHi, err = localPortRange(); err != nil {
		return err
	}
	d.shared = &packet.Shared{Config: &d.cfg, Flows: d.flows, Install: d.inst, Uplinks: &d.uplinks, Balance: &d.balance,
		Events: d.events, Log: d.log, Stats: &d.stats, Decisions: d.metrics.decisions, Latency: d.metrics.latency,
		PortLo: d.portLo, PortHi: d.portHi, Userspace: d.userspace, FailClosed: d.failClosed}
	// One daemon per table, before anything is touched: a second one
	// must leave the first one's table, queues and routing alone.
	lock, err := instance.Acquire(nftdp.TableName)
	if err != nil {
		return err
	}
	var undo []func() error // teardown, run in reverse
	defer func() {
		for i := len(undo) - 1; i >= 0; i-- {
			err = errors.Join(err, undo[i]())
		}
	}()
	undo = append(undo, lock.Release)
	runCtx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	undo = append(undo, func() error { stop(); wg.Wait(); return nil })

	// Managed uplinks' routing first: the table's rules rely on it.
	routing, err := uplink.Install(cfg, d.log)
	if err != nil {
		return err
	}
	var detached bool // set before the undo list runs: keep the kernel state
	undo = append(undo, func() error {
		if detached {
			routing.Close()
			return nil
		}
		return routing.Remove()
	})

	// Every uplink's state, before the first flow is decided.
	if _, err := routing.UpdateStates(&d.uplinks, cfg.Uplinks, time.Now()); err != nil {
		return err
	}
	for _, st := range d.uplinks.List() {
		if !st.Up {
			d.log.Warn("uplink is down at start", "uplink", st.Uplink, "family", st.Family, "why", st.Why)
		}
	}
	changed := make(chan struct{}, 1) // a routing change: check the managed routing, states and flows
	d.routingChanged = changed
	watched, err := route.Watch(runCtx, &d.routing, changed)
	if err != nil {
		return err
	}
	undo = append(undo, func() error { stop(); <-watched; return nil })
	moveDiag, err := sockdiag.Open()
	if err != nil {
		return err
	}
	undo = append(undo, moveDiag.Close)
	moveRoutes, err := route.NewCache(&d.routing)
	if err != nil {
		return err
	}
	undo = append(undo, func() error { moveRoutes.Close(); return nil })
	for _, u := range cfg.Uplinks {
		if u.Health != nil {
			wg.Add(1)
			go func() {
				defer wg.Done()
				uplink.RunProbes(runCtx, u, &d.uplinks, func(ts []uplink.Transition) {
					for _, tr := range ts {
						d.uplinkChanged(tr.Status)
					}
					d.republishSteering()
				})
			}()
		}
	}
	kept := make(chan struct{})
	go func() { defer close(kept); d.keepRouting(runCtx, routing, moveDiag, moveRoutes, changed) }()
	undo = append(undo, func() error { stop(); <-kept; return nil }) // before its sockets close
	sweepDiag, err := sockdiag.Open()
	if err != nil {
		return err
	}
	undo = append(undo, sweepDiag.Close)

	ctl, err := instance.ListenControl(cfg.Daemon.ControlSocket, d.log)
	if err != nil {
		return err
	}
	undo = append(undo, func() error {
		err := ctl.Close() // the control server may have closed it already
		if errors.Is(err, net.ErrClosed) {
			err = nil
		}
		if rerr := os.Remove(cfg.Daemon.ControlSocket); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
		return err
	})

	nq := uint16(cfg.Daemon.Queues)
	if d.dp, err = nftdp.Install(cfg.Daemon.Queue, nq, d.userspace, cfg.Daemon.IdleTimeout, nftdp.FilterOf(cfg)); err != nil {
		return err
	}
	if d.dp.DefragErr != nil {
		d.log.Warn("the kernel cannot reassemble IP fragments for rerouted: a datagram of a translated flow that arrives in fragments is lost",
			"err", d.dp.DefragErr)
	}
	if d.dp.Replaced {
		d.log.Warn("removed a table left by an earlier run; its flows are no longer translated", "table", "inet "+nftdp.TableName)
	}
	undo = append(undo, func() error {
		n := d.flows.Len()
		if detached {
			d.log.Info("left the table for the next start", "table", "inet "+nftdp.TableName, "flows", n)
			return d.dp.Close()
		}
		err := d.dp.Remove()
		d.log.Info("removed table", "table", "inet "+nftdp.TableName, "flows", n)
		return err
	})
	if d.dp.Adopted {
		if err := d.adopt(sweepDiag); err != nil {
			return err
		}
	}
	// From here on, what others do to the table is put back. The guard
	// stops before the table is removed, or it would put it back.
	mon, err := d.dp.Monitor()
	if err != nil {
		return err
	}
	guarded := make(chan struct{})
	go func() { defer close(guarded); d.guardTable(runCtx, mon) }()
	undo = append(undo, func() error { stop(); <-guarded; return mon.Close() })

	if cfg.Daemon.Steering == "connect" {
		if err := d.startSteering(cfg); err != nil {
			d.log.Warn("connect-time steering is not available: every new flow is decided at the queue", "err", err)
		} else {
			undo = append(undo, func() error { return d.stopSteering(detached) })
		}
	}

	// The kernel announces each UDP socket it destroys: its flows end at
	// once, so that a new socket on the same tuple is decided afresh
	// rather than inheriting the old decision until the sweeps notice.
	if closes, err := sockdiag.WatchUDPDestroyed(); err != nil {
		d.log.Warn("UDP sockets' ends are noticed by the sweep only (a new socket on a closed one's tuple keeps its decision for up to two sweeps)", "err", err)
	} else {
		var closing atomic.Bool
		watched := make(chan struct{})
		go func() { defer close(watched); d.watchUDPCloses(closes, &closing) }()
		undo = append(undo, func() error { closing.Store(true); err := closes.Close(); <-watched; return err })
	}

	if addr := cfg.Daemon.MetricsListen; addr != "" {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("metrics_listen: %w", err)
		}
		undo = append(undo, func() error {
			if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				return err
			}
			return nil
		})
		wg.Add(1)
		go func() { defer wg.Done(); d.serveMetrics(runCtx, ln) }()
	}
	wg.Add(4)
	go func() { defer wg.Done(); d.inst.Run(runCtx) }()
	go func() { defer wg.Done(); d.sweepLoop(runCtx, sweepDiag) }()
	go func() { defer wg.Done(); control.Serve(runCtx, ctl, controlSource{d}, d.log) }()
	go func() { defer wg.Done(); d.reloadLoop(runCtx, o.Reload) }()
	// Teardown stops these goroutines (and the probes, and the metrics
	// server) before it closes anything they use: the table, the sockets,
	// the routing.
	undo = append(undo, func() error { stop(); wg.Wait(); return nil })

	// Workers last: binding a queue is what makes new connections ours, so
	// "ready" means they are translated, not passed by the queue's bypass.
	for i := uint16(0); i < nq; i++ {
		wk, q, closeWorker, err := d.newWorker(cfg.Daemon.Queue + i)
		if err != nil {
			return err
		}
		undo = append(undo, closeWorker)
		if err := q.Start(runCtx, wk.Handle, wk.EndBatch, func(err error) {
			d.stats.Errors[packet.ErrQueueReceive].Add(1)
			d.log.Error("nfqueue receive", "queue", q.Num, "err", err)
		}); err != nil {
			return err
		}
	}
	d.log.Info("ready", "config", cfg.File, "queue", cfg.Daemon.Queue, "queues", nq, "queue_method", d.dp.QueueMethod, "datapath", cfg.Daemon.Datapath,
		"table", "inet "+nftdp.TableName, "honor_marks", cfg.Daemon.HonorMarks, "uplinks", len(cfg.Uplinks),
		"rules", len(cfg.Rules), "control_socket", cfg.Daemon.ControlSocket, "metrics_listen", cfg.Daemon.MetricsListen)
	d.notify("READY=1")
	select {
	case <-ctx.Done():
	case <-o.Detach:
		detached = true
		stop() // as a done ctx would: every goroutine ends before teardown
	}
	d.notify("STOPPING=1")
	d.log.Info("stopping", "syns", d.stats.SYNs.Load(), "datagram_flows", d.stats.Datagrams.Load(), "idle_ended", d.stats.Idle.Load(),
		"translated", d.stats.Translated.Load(),
		"retransmitted_syns", d.stats.Retrans.Load(),
		"dropped", d.stats.Dropped.Load(), "icmp_errors", d.stats.ICMPErrors.Load(), "forwarded", d.stats.Forwarded.Load(),
		"forwarded_bytes", d.stats.Bytes.Load(), "flows", d.flows.Len())
	if detached {
		return ErrDetached
	}
	return nil
}

// adopt takes over the flows whose elements an earlier run left in the
// table: each keeps its translation while its socket lives (TCP and UDP,
// found again by sock_diag) or, with no socket to follow, until idle.
// Elements whose socket is gone are removed.
func (d *Daemon) adopt(diag *sockdiag.Conn) error {
	entries, err := d.dp.Entries()
	if err != nil {
		return fmt.Errorf("adopt flows: %w", err)
	}
	rt, err := route.NewCache(&d.routing)
	if err != nil {
		return err
	}
	defer rt.Close()
	now := time.Now()
	var gone []nftdp.Entry
	adopted := 0
	for _, e := range entries {
		f := &flow.Flow{Key: flow.Key{Proto: e.Proto, Src: e.Src, Dst: e.Dst}, NewSrc: e.NewSrc, Mark: e.Mark, Pass: e.Pass,
			Rule: "adopted", Start: now, UsedAt: now}
		if e.Proto == ipproto.TCP || e.Proto == ipproto.UDP {
			var so sockdiag.Socket
			err := diag.Lookup(e.Proto, e.Src, e.Dst, &so)
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
		if !d.inst.Adopt(f) {
			gone = append(gone, e) // two elements claim one tuple: keep the first
			continue
		}
		adopted++
		if !f.Pass {
			d.events.Flow("ADOPT", f)
		}
	}
	if len(gone) > 0 {
		if err := d.dp.Delete(gone...); err != nil {
			return fmt.Errorf("adopt flows: remove %d whose socket is gone: %w", len(gone), err)
		}
	}
	d.log.Info("adopted the flows an earlier run left", "flows", adopted, "removed", len(gone))
	return nil
}

// newWorker opens the sockets of one queue's packet path.
func (d *Daemon) newWorker(num uint16) (*packet.Worker, *queue.Queue, func() error, error) {
	diag, err := sockdiag.Open()
	if err != nil {
		return nil, nil, nil, err
	}
	routes, err := route.NewCache(&d.routing)
	if err != nil {
		diag.Close()
		return nil, nil, nil, err
	}
	o := queue.Options{Rcvbuf: queueRcvbuf, FailClosed: d.failClosed}
	if d.userspace {
		// GSO packets whole: a 64 KB segment is one packet to rewrite, not
		// 45 (the kernel segments it after the verdict).
		o.Rcvbuf, o.GSO = queueRcvbufUserspace, true
	}
	q, err := queue.Open(num, o)
	if err != nil {
		diag.Close()
		routes.Close()
		return nil, nil, nil, err
	}
	w := packet.NewWorker(d.shared, q, packet.DiagSockets{Conn: diag}, routes, owner.NewOwners())
	return w, q, func() error {
		err := q.Close()
		routes.Close()
		return errors.Join(err, diag.Close())
	}, nil
}

// watchUDPCloses ends the flows of each UDP socket the kernel destroys,
// until closing is set and the subscription closed.
func (d *Daemon) watchUDPCloses(w *sockdiag.Destroyed, closing *atomic.Bool) {
	ended := func(s *sockdiag.Socket) {
		for _, f := range d.flows.ByCookie(s.Cookie) {
			d.stats.UDPClosed.Add(1)
			d.log.Debug("socket closed", "proto", "udp", "src", f.Src, "dst", f.Dst, "cookie", f.Cookie)
			d.shared.Forget(f)
		}
	}
	for {
		err := w.Receive(ended)
		switch {
		case err == nil:
		case closing.Load():
			return
		case errors.Is(err, sockdiag.ErrLost):
			d.stats.Errors[packet.ErrCloseEvents].Add(1)
			d.log.Warn("UDP socket ends were lost (too many at once); the sweep ends their flows", "err", err)
		default:
			d.stats.Errors[packet.ErrCloseEvents].Add(1)
			d.log.Error("UDP socket ends: no longer received; the sweep ends their flows", "err", err)
			return
		}
	}
}

// reloadLoop replaces the policy on each reload request. A file with any
// error is rejected as a whole and the running policy stays; new flows use
// the new policy, existing flows keep their translation.
func (d *Daemon) reloadLoop(ctx context.Context, reload <-chan struct{}) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-reload:
		}
		d.notify(fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d", monotonicUsec()))
		d.reload()
		d.notify("READY=1")
	}
}

// monotonicUsec is CLOCK_MONOTONIC in microseconds, which systemd wants
// with RELOADING=1.
func monotonicUsec() int64 {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano() / 1000
}

// reload replaces the policy from the configuration file, or keeps it.
func (d *Daemon) reload() {
	old := d.cfg.Load()
	if !d.insecure {
		// Someone may have loosened the file since the start.
		if err := filesafety.Check(old.File); err != nil {
			d.log.Error("reload rejected; the current policy stays in force", "config", old.File, "err", err)
			return
		}
	}
	cfg, err := policy.Load(old.File)
	if err == nil {
		err = uplink.CheckInterfaces(cfg.Uplinks)
	}
	if err != nil {
		var es policy.Errors
		if errors.As(err, &es) {
			for _, e := range es {
				d.log.Error("reload: " + e.Error())
			}
		}
		d.log.Error("reload rejected; the current policy stays in force", "config", old.File, "err", err)
		return
	}
	if cfg.Daemon != old.Daemon {
		d.log.Warn("reload: [daemon] settings take effect at the next start", "config", cfg.File)
		cfg.Daemon = old.Daemon
	}
	// Probes and managed routing are set up at the start; rules and
	// uplinks' marks and fallbacks change now.
	for _, u := range cfg.Uplinks {
		o := old.UplinkByName(u.Name)
		switch {
		case o == nil && (u.Health != nil || u.Managed()):
			d.log.Warn("reload: a new uplink's [uplink.health] and managed routing take effect at the next start", "uplink", u.Name)
		case o == nil:
		case !reflect.DeepEqual(o.Health, u.Health):
			d.log.Warn("reload: [uplink.health] changes take effect at the next start", "uplink", u.Name)
		case o.Interface != u.Interface || o.Gateway != u.Gateway || o.Gateway6 != u.Gateway6 || o.GatewayAuto != u.GatewayAuto || o.Table != u.Table:
			d.log.Warn("reload: managed routing changes take effect at the next start", "uplink", u.Name)
		}
	}
	// The kernel's prefilter and the policy change together: first a
	// filter that queues what either policy concerns, then the policy,
	// then the new policy's own filter. No packet the new policy
	// concerns slips past the queue meanwhile.
	oldFilter, newFilter := nftdp.FilterOf(old), nftdp.FilterOf(cfg)
	if err := d.dp.SetFilter(nftdp.Union(oldFilter, newFilter)); err != nil {
		d.stats.Errors[packet.ErrInstall].Add(1)
		d.log.Error("reload rejected: the kernel refused the new prefilter; the current policy stays in force", "config", cfg.File, "err", err)
		if err := d.dp.SetFilter(oldFilter); err != nil {
			d.log.Error("restore the prefilter", "err", err)
		}
		return
	}
	d.cfg.Store(cfg)
	d.applySteering(cfg)
	if err := d.dp.SetFilter(newFilter); err != nil {
		d.stats.Errors[packet.ErrInstall].Add(1)
		d.log.Error("reload: the kernel refused the new prefilter; the union of both stays, so more reaches the daemon than needs to", "err", err)
	}
	select { // the uplinks may have changed: their states
	case d.routingChanged <- struct{}{}:
	default:
	}
	d.log.Info("reloaded", "config", cfg.File, "uplinks", len(cfg.Uplinks), "rules", len(cfg.Rules))
}

// localPortRange reads the ephemeral port range new source ports are drawn
// from, as the kernel does for connect().
func localPortRange() (uint16, uint16, error) {
	const f = "/proc/sys/net/ipv4/ip_local_port_range"
	b, err := os.ReadFile(f)
	if err != nil {
		return 0, 0, fmt.Errorf("read %s: %w", f, err)
	}
	fs := strings.Fields(string(b))
	if len(fs) != 2 {
		return 0, 0, fmt.Errorf("%s: unexpected %q", f, b)
	}
	lo, err1 := strconv.ParseUint(fs[0], 10, 16)
	hi, err2 := strconv.ParseUint(fs[1], 10, 16)
	if err1 != nil || err2 != nil || lo == 0 || lo > hi {
		return 0, 0, fmt.Errorf("%s: unexpected %q", f, b)
	}
	return uint16(lo), uint16(hi), nil
}

// sweepLoop removes flows whose socket is gone, and UDP and echo flows
// that have been idle for the idle timeout. A dump (not destroy
// notifications) is what shows TIME_WAIT sockets, which still own their
// tuple.
func (d *Daemon) sweepLoop(ctx context.Context, diag *sockdiag.Conn) {
	every := d.cfg.Load().Daemon.GCInterval
	t := time.NewTicker(every)
	defer t.Stop()
	udp := map[uint64]struct{}{} // cookies of live UDP sockets, reused
	var lastIdle time.Time
	var listing time.Duration // what the last idle check took
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if d.flows.Len() == 0 {
			continue
		}
		d.sweep(diag, udp)
		d.balance.Expire(time.Now())
		d.reportOverBudget()
		// Idleness is read from the kernel's packet counters, a listing of
		// every UDP and echo element: often enough to end flows within an
		// eighth of the timeout of it, and at most a tenth of the time (the
		// kernel lists 100,000 elements in ~3 s; new flows do not wait for
		// it, the sweeps do).
		idle := d.cfg.Load().Daemon.IdleTimeout
		if now := time.Now(); now.Sub(lastIdle) >= max(every, idle/8, 10*listing) {
			lastIdle = now
			d.expireIdle(now, idle)
			listing = time.Since(now)
		}
	}
}

// sweep removes the flows whose socket is gone: TCP sockets are matched by
// tuple and cookie, UDP sockets by cookie (an unconnected socket serves
// many tuples). Echo flows, and UDP flows whose socket was never found,
// end by idleness only.
func (d *Daemon) sweep(diag *sockdiag.Conn, udp map[uint64]struct{}) {
	s := d.flows.BeginSweep(time.Now())
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
		d.stats.Errors[packet.ErrSweep].Add(1)
		d.log.Error("socket dump failed; no flow removed this round", "err", err)
		return
	}
	// The dump only nominates: an exact lookup confirms each socket is
	// gone, in two sweeps running. One is not enough: a connection moving
	// to TIME_WAIT was once missed by both the dump and the lookup (seen
	// once in many thousands, age 100 ms), and removing a TIME_WAIT
	// socket's translation early resets its peer.
	var so sockdiag.Socket
	suspects := make(map[*flow.Flow]struct{}, len(d.suspects))
	defer func() { d.suspects = suspects }()
	for _, f := range s.End() {
		if f.Cookie == 0 {
			continue // no socket to follow: idleness ends it
		}
		if _, ok := udp[f.Cookie]; ok && f.Proto == ipproto.UDP {
			continue
		}
		err := diag.Lookup(f.Proto, f.Src, f.Dst, &so)
		switch {
		case err == nil && so.Cookie == f.Cookie:
			continue // alive: the dump missed it
		case err != nil && !errors.Is(err, sockdiag.ErrNotFound):
			d.stats.Errors[packet.ErrSocketLookup].Add(1)
			d.log.Error("socket lookup", "src", f.Src, "dst", f.Dst, "err", err)
			continue
		}
		if _, again := d.suspects[f]; !again {
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
func (d *Daemon) expireIdle(now time.Time, timeout time.Duration) {
	uses, err := d.dp.Uses()
	if err != nil {
		d.stats.Errors[packet.ErrSweep].Add(1)
		d.log.Error("read flow packet counters; no flow ended by idleness this round", "err", err)
		return
	}
	total := make(map[*flow.Flow]uint64, len(uses))
	for _, u := range uses {
		var f *flow.Flow
		if u.Reply {
			f = d.flows.ByWire(flow.Key{Proto: u.Proto, Src: u.Src, Dst: u.Dst})
		} else {
			f = d.flows.Get(flow.Key{Proto: u.Proto, Src: u.Src, Dst: u.Dst})
		}
		if f != nil {
			total[f] += u.Packets
		}
	}
	for _, f := range d.flows.Snapshot() {
		if !f.Idles() {
			continue
		}
		if n := total[f]; n != f.Used {
			f.Used, f.UsedAt = n, now
			continue
		}
		if now.Sub(f.UsedAt) >= timeout {
			d.stats.Idle.Add(1)
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
func (d *Daemon) reportOverBudget() {
	over, err := d.dp.OverBudget()
	if err != nil {
		d.stats.Errors[packet.ErrSweep].Add(1)
		d.log.Error("read the per-user budget's counts", "err", err)
		return
	}
	if d.overSeen == nil {
		d.overSeen = map[uint32]uint64{}
	}
	how := "left untranslated (on_failure = \"open\")"
	if d.failClosed {
		how = "dropped (on_failure = \"closed\")"
	}
	for uid, n := range over {
		if n > d.overSeen[uid] {
			d.log.Warn("a user opened new flows faster than its budget; the rest were "+how, "uid", uid,
				"over_budget", n-d.overSeen[uid], "total", n, "budget_per_second", d.cfg.Load().Daemon.NewFlowsPerUID)
			d.overSeen[uid] = n
		}
	}
}
