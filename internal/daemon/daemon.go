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
//   - the sweeper (package lifetime) owns a sock_diag socket for dumps (it
//     adopts an earlier run's flows with it before it starts); the
//     watchers of UDP and TCP sockets' ends own their subscriptions;
//   - the routing watcher (route.Watch) owns an rtnetlink notification
//     socket; the routing keeper (routing.go) acts on what it sees;
//   - the control server (package control) answers `rerouted flows` and
//     `rerouted uplinks`; the metrics server, /metrics (package
//     daemon/metrics).
//
// Managed uplinks' routes and rules are installed before anything else and
// removed after everything else, on their own rtnetlink socket (package
// uplink).
//
// The installer (flow.Installer) owns the ordering rule (explained in
// internal/flow/install.go): it alone changes the flow table.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rerouted/rerouted/internal/control"
	"github.com/rerouted/rerouted/internal/daemon/metrics"
	"github.com/rerouted/rerouted/internal/events"
	"github.com/rerouted/rerouted/internal/filesafety"
	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/instance"
	"github.com/rerouted/rerouted/internal/lifetime"
	"github.com/rerouted/rerouted/internal/nftdp"
	"github.com/rerouted/rerouted/internal/nftdp/prefilter"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/packet"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/queue"
	"github.com/rerouted/rerouted/internal/route"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/steer"
	"github.com/rerouted/rerouted/internal/uplink"
	"github.com/rerouted/rerouted/internal/usage"
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

// Daemon is one running instance. What the packet path shares with the
// rest (the installer and, through it, the flow table; the datapath, the
// failure mode and the port range; the debug stream; the packet path's
// counts) is in shared, once: the daemon reads it there.
type Daemon struct {
	cfg     atomic.Pointer[policy.Config] // swapped whole on reload
	log     *slog.Logger
	steer   atomic.Pointer[steer.Steering] // connect-time steering, once it runs; nil when off (read by the probes, the routing keeper, the control server, the metrics)
	dp      *nftdp.Datapath
	uplinks uplink.States   // each uplink's state, per family
	balance uplink.Balancer // balance rules' choices, and the sticky ones kept
	// routingChanged wakes the routing keeper (keepRouting), as a routing
	// change does.
	routingChanged chan<- struct{}
	shared         *packet.Shared // what the packet path shares with the rest
	metrics        *metrics.Metrics
	notify         func(state string)
	insecure       bool // InsecureConfig

	routing atomic.Uint64     // bumped on every routing change: route caches are stale
	counts                    // the daemon's own counts (the packet path's are shared.Stats)
	sweeper *lifetime.Sweeper // once the table is open
	// usageState is the state file as read at the start; usage, the
	// ledger over the kernel's counts, once they run (nil: no accounting).
	usageState *usage.State
	usage      *usage.Ledger
	reloads    <-chan struct{} // Options.Reload

	// The lifecycle (Run): open adds to undo what close undoes; stop ends
	// every goroutine's context; detached (set by serve, read by close)
	// leaves the kernel state for the next start.
	undo     []func() error
	stop     context.CancelFunc
	wg       sync.WaitGroup
	detached bool
}

// inst is the installer: flows enter and leave the table only through it.
func (d *Daemon) inst() *flow.Installer { return d.shared.Install }

// flows is the flow table, for reading (the installer's).
func (d *Daemon) flows() *flow.Table { return d.shared.Install.Table() }

// lifetimeEnv is what the flows' end (package lifetime) is given.
func (d *Daemon) lifetimeEnv() lifetime.Env {
	return lifetime.Env{Shared: d.shared, Idle: &d.idle, UDPClosed: &d.udpClosed, SweepErrors: &d.errors[errSweep],
		UDPEvents: &d.errors[errUDPCloseEvents], TCPEvents: &d.errors[errTCPCloseEvents]}
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
	// The heap is mostly long-lived flow state: collect at 50% growth
	// rather than 100%, a little CPU for a third less memory.
	debug.SetGCPercent(50)
	d := newDaemon(o)
	runCtx, stop := context.WithCancel(ctx)
	d.stop = stop
	defer func() { err = errors.Join(err, d.close()) }()
	if err := d.open(runCtx); err != nil {
		return err
	}
	return d.serve(ctx, o.Detach)
}

// newDaemon is the daemon of o, with nothing opened yet.
func newDaemon(o Options) *Daemon {
	cfg := o.Config
	d := &Daemon{log: o.Log, notify: o.Notify, insecure: o.InsecureConfig, reloads: o.Reload}
	if d.notify == nil {
		d.notify = func(string) {}
	}
	d.cfg.Store(cfg)
	d.shared = &packet.Shared{Config: &d.cfg, Uplinks: &d.uplinks, Balance: &d.balance, Log: d.log, Stats: new(packet.Stats),
		Userspace: cfg.Daemon.Datapath == "userspace", FailClosed: cfg.Daemon.FailClosed}
	d.shared.Install = flow.NewInstaller(newFlowKernel(d), d.installFailed)
	d.metrics = metrics.New(&metrics.Daemon{Log: d.log, Config: &d.cfg, Stats: d.shared.Stats, FailClosed: d.shared.FailClosed,
		ErrorKinds: errKindNames[:], Errors: d.errors[:], Idle: &d.idle, UDPClosed: &d.udpClosed, Flows: d.flows, Uplinks: &d.uplinks,
		Steer: &d.steer, Datapath: func() *nftdp.Datapath { return d.dp },
		Usage: usage.NewCollector(d.usageReport, cfg.Usage.Top)})
	d.shared.Decisions, d.shared.Latency = d.metrics.Decisions, d.metrics.Latency
	if o.Events != nil {
		kinds := o.EventKinds
		if kinds == 0 {
			kinds = events.All
		}
		d.shared.Events = events.NewWriter(o.Events, kinds)
	}
	return d
}

// atClose adds to what close undoes, last first.
func (d *Daemon) atClose(undo func() error) { d.undo = append(d.undo, undo) }

// close stops every goroutine and removes what open installed, in the
// reverse order (with detached, leaving the kernel state for the next
// start).
func (d *Daemon) close() error {
	var err error
	for i := len(d.undo) - 1; i >= 0; i-- {
		err = errors.Join(err, d.undo[i]())
	}
	d.undo = nil
	return err
}

// open installs everything and starts every goroutine, each under ctx,
// the packet workers last. What it did is undone by close, also when it
// fails part of the way.
func (d *Daemon) open(ctx context.Context) error {
	cfg := d.cfg.Load()
	if err := uplink.CheckInterfaces(cfg.Uplinks); err != nil {
		return err
	}
	var err error
	if d.shared.PortLo, d.shared.PortHi, err = localPortRange(); err != nil {
		return err
	}
	// One daemon per table, before anything is touched: a second one
	// must leave the first one's table, queues and routing alone.
	lock, err := instance.Acquire(nftdp.TableName)
	if err != nil {
		return err
	}
	d.atClose(lock.Release)
	if err := d.loadUsageState(cfg); err != nil {
		return err
	}
	d.atClose(func() error { d.stop(); d.wg.Wait(); return nil })
	if err := d.openRouting(ctx, cfg); err != nil {
		return err
	}
	sweepDiag, err := sockdiag.Open()
	if err != nil {
		return err
	}
	d.atClose(sweepDiag.Close)
	ctl, err := instance.ListenControl(cfg.Daemon.ControlSocket, d.log)
	if err != nil {
		return err
	}
	d.atClose(func() error {
		err := ctl.Close() // the control server may have closed it already
		if errors.Is(err, net.ErrClosed) {
			err = nil
		}
		if rerr := os.Remove(cfg.Daemon.ControlSocket); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
			err = errors.Join(err, rerr)
		}
		return err
	})
	if err := d.openTable(ctx, cfg, sweepDiag); err != nil {
		return err
	}
	if err := d.startServices(ctx, cfg, sweepDiag, ctl); err != nil {
		return err
	}
	return d.startWorkers(ctx, cfg)
}

// openRouting installs managed uplinks' routing (the table's rules rely on
// it), reads every uplink's state, and starts what keeps them current:
// the routing watcher, the health probes and the routing keeper.
func (d *Daemon) openRouting(ctx context.Context, cfg *policy.Config) error {
	routing, err := uplink.Install(cfg, d.log)
	if err != nil {
		return err
	}
	d.atClose(func() error {
		if d.detached {
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
	watched, err := route.Watch(ctx, &d.routing, changed)
	if err != nil {
		return err
	}
	d.atClose(func() error { d.stop(); <-watched; return nil })
	moveDiag, err := sockdiag.Open()
	if err != nil {
		return err
	}
	d.atClose(moveDiag.Close)
	moveRoutes, err := route.NewCache(&d.routing)
	if err != nil {
		return err
	}
	d.atClose(func() error { moveRoutes.Close(); return nil })
	for _, u := range cfg.Uplinks {
		if u.Health != nil {
			d.wg.Add(1)
			go func() {
				defer d.wg.Done()
				uplink.RunProbes(ctx, u, &d.uplinks, func(ts []uplink.Transition) {
					d.republish() // before the announcement, as keepRouting does
					for _, tr := range ts {
						d.uplinkChanged(tr.Status)
					}
				})
			}()
		}
	}
	kept := make(chan struct{})
	go func() { defer close(kept); d.keepRouting(ctx, routing, moveDiag, moveRoutes, changed) }()
	d.atClose(func() error { d.stop(); <-kept; return nil }) // before its sockets close
	return nil
}

// openTable installs the nftables table (or adopts the flows of the one
// an earlier run left, with the sweeper's socket), and starts guarding it.
func (d *Daemon) openTable(ctx context.Context, cfg *policy.Config, sweepDiag sockdiag.Sockets) error {
	var err error
	nq := uint16(cfg.Daemon.Queues)
	if d.dp, err = nftdp.Install(cfg.Daemon.Queue, nq, d.shared.Userspace, cfg.Daemon.IdleTimeout, prefilter.FilterOf(cfg)); err != nil {
		return err
	}
	if d.dp.DefragErr != nil {
		d.log.Warn("the kernel cannot reassemble IP fragments for rerouted: a datagram of a translated flow that arrives in fragments is lost",
			"err", d.dp.DefragErr)
	}
	if d.dp.Replaced {
		d.log.Warn("removed a table left by an earlier run; its flows are no longer translated", "table", "inet "+nftdp.TableName)
	}
	d.atClose(func() error {
		n := d.flows().Len()
		if d.detached {
			d.log.Info("left the table for the next start", "table", "inet "+nftdp.TableName, "flows", n)
			return d.dp.Close()
		}
		err := d.dp.Remove()
		d.log.Info("removed table", "table", "inet "+nftdp.TableName, "flows", n)
		return err
	})
	d.sweeper = lifetime.New(d.lifetimeEnv(), sweepDiag, d.dp)
	if d.dp.Adopted {
		rt, err := route.NewCache(&d.routing)
		if err != nil {
			return err
		}
		err = d.sweeper.Adopt(rt)
		rt.Close()
		if err != nil {
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
	go func() { defer close(guarded); d.guardTable(ctx, mon) }()
	d.atClose(func() error { d.stop(); <-guarded; return mon.Close() })
	return nil
}

// startServices starts what works beside the packet path: connect-time
// steering, the learner of the kernel's decisions, the watcher of UDP
// sockets' ends, the metrics server, the installer, the sweeper, the
// control server and the reloader.
func (d *Daemon) startServices(ctx context.Context, cfg *policy.Config, sweepDiag sockdiag.Sockets, ctl net.Listener) error {
	d.startUsage(ctx, cfg, sweepDiag)
	if cfg.Daemon.Steering == "connect" {
		if err := d.startSteering(cfg); err != nil {
			steer.LogFailure(d.log, err)
		} else {
			d.atClose(func() error { return d.stopSteering(d.detached) })
		}
	}

	// Host marks the kernel decides itself: it logs each flow it decided,
	// and the learner enters it. Bound before the kernel may decide.
	if d.dp.HostMarkErr != nil {
		d.log.Warn("the kernel cannot decide host-marked flows itself: they are decided at the queue", "err", d.dp.HostMarkErr)
	} else if cfg.Daemon.HonorMarks && cfg.Daemon.HostMarks == "kernel" {
		stopLearning, err := d.startLearning(ctx)
		if err != nil {
			return err
		}
		d.atClose(stopLearning)
		d.publishHostMarks()
	}

	// The kernel announces each UDP and TCP socket it destroys: their
	// flows end at once (lifetime.WatchUDP, WatchTCP).
	if stop, err := lifetime.WatchUDP(d.lifetimeEnv()); err != nil {
		d.log.Warn("UDP sockets' ends are noticed by the sweep only (a new socket on a closed one's tuple keeps its decision for up to two sweeps)", "err", err)
	} else {
		d.atClose(stop)
	}
	if stop, err := lifetime.WatchTCP(d.lifetimeEnv()); err != nil {
		d.log.Warn("TCP sockets' ends are noticed by the sweep only (a flow ends up to two sweeps after its socket)", "err", err)
	} else {
		d.atClose(stop)
	}

	if addr := cfg.Daemon.MetricsListen; addr != "" {
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("metrics_listen: %w", err)
		}
		d.atClose(func() error {
			if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				return err
			}
			return nil
		})
		d.wg.Add(1)
		go func() { defer d.wg.Done(); d.metrics.Serve(ctx, ln, d.log) }()
	}
	d.wg.Add(4)
	go func() { defer d.wg.Done(); d.inst().Run(ctx) }()
	go func() { defer d.wg.Done(); d.sweeper.Run(ctx) }()
	go func() { defer d.wg.Done(); control.Serve(ctx, ctl, controlSource{d}, d.log) }()
	go func() { defer d.wg.Done(); d.reloadLoop(ctx, d.reloads) }()
	// Teardown stops these goroutines (and the probes, and the metrics
	// server) before it closes anything they use: the table, the sockets,
	// the routing.
	d.atClose(func() error { d.stop(); d.wg.Wait(); return nil })
	return nil
}

// startWorkers binds the queues, each with its packet path: last, since
// binding a queue is what makes new connections ours, so "ready" means
// they are translated, not passed by the queue's bypass. With a per-user
// budget, one more queue after them: the overflow, where flows over their
// user's budget wait (prefilter.Filter).
func (d *Daemon) startWorkers(ctx context.Context, cfg *policy.Config) error {
	nq := uint16(cfg.Daemon.Queues)
	queues := []uint16{}
	for i := uint16(0); i < nq; i++ {
		queues = append(queues, cfg.Daemon.Queue+i)
	}
	if cfg.Daemon.NewFlowsPerUID > 0 {
		queues = append(queues, prefilter.OverflowQueue(cfg))
	}
	for i, num := range queues {
		wk, q, closeWorker, err := d.newWorker(num, i == int(nq))
		if err != nil {
			return err
		}
		d.atClose(closeWorker)
		if err := q.Start(ctx, wk.Handle, wk.EndBatch, func(err error) {
			d.errors[errQueueReceive].Add(1)
			d.log.Error("nfqueue receive", "queue", q.Num, "err", err)
		}); err != nil {
			return err
		}
	}
	return nil
}

// serve says the daemon is ready, and waits until ctx is done or detach
// receives. It returns ErrDetached for the latter; close then leaves the
// kernel state in place.
func (d *Daemon) serve(ctx context.Context, detach <-chan struct{}) error {
	cfg := d.cfg.Load()
	d.log.Info("ready", "config", cfg.File, "host_marks", hostMarksWhere(d.dp, cfg), "queue", cfg.Daemon.Queue, "queues", cfg.Daemon.Queues, "queue_method", d.dp.QueueMethod, "datapath", cfg.Daemon.Datapath,
		"table", "inet "+nftdp.TableName, "honor_marks", cfg.Daemon.HonorMarks, "uplinks", len(cfg.Uplinks),
		"rules", len(cfg.Rules), "control_socket", cfg.Daemon.ControlSocket, "metrics_listen", cfg.Daemon.MetricsListen)
	d.notify("READY=1")
	select {
	case <-ctx.Done():
	case <-detach:
		d.detached = true
		d.stop() // as a done ctx would: every goroutine ends before teardown
	}
	d.notify("STOPPING=1")
	st := d.shared.Stats
	d.log.Info("stopping", "syns", st.SYNs.Load(), "datagram_flows", st.Datagrams.Load(), "idle_ended", d.idle.Load(),
		"translated", st.Translated.Load(),
		"retransmitted_syns", st.Retrans.Load(),
		"dropped", st.Dropped.Load(), "icmp_errors", st.ICMPErrors.Load(), "forwarded", st.Forwarded.Load(),
		"forwarded_bytes", st.Bytes.Load(), "flows", d.flows().Len())
	if d.detached {
		return ErrDetached
	}
	return nil
}

// newWorker opens the sockets of one queue's packet path.
//
// The overflow queue is never fail-open: when a flood fills it, what it is
// offered is dropped, and its sockets retry, rather than sent untranslated.
func (d *Daemon) newWorker(num uint16, overflow bool) (*packet.Worker, *queue.Queue, func() error, error) {
	diag, err := sockdiag.Open()
	if err != nil {
		return nil, nil, nil, err
	}
	routes, err := route.NewCache(&d.routing)
	if err != nil {
		diag.Close()
		return nil, nil, nil, err
	}
	o := queue.Options{Rcvbuf: queueRcvbuf, FailClosed: d.shared.FailClosed || overflow}
	if d.shared.Userspace {
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
	w := packet.NewWorker(d.shared, q, diag, routes, owner.NewOwners())
	return w, q, func() error {
		err := q.Close()
		routes.Close()
		return errors.Join(err, diag.Close())
	}, nil
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
	if keys := restartKeys(old, cfg); len(keys) > 0 {
		d.log.Error("reload rejected: changed keys take effect only at a start (systemctl restart rerouted, or SIGUSR2 to keep live flows); the current policy stays in force",
			"config", cfg.File, "keys", strings.Join(keys, ", "))
		return
	}
	// The kernel's prefilter and the policy change together: first a
	// filter that queues what either policy concerns, then the policy,
	// then the new policy's own filter. No packet the new policy
	// concerns slips past the queue meanwhile.
	oldFilter, newFilter := prefilter.FilterOf(old), prefilter.FilterOf(cfg)
	if err := d.dp.SetFilter(prefilter.Union(oldFilter, newFilter)); err != nil {
		d.errors[errInstall].Add(1)
		d.log.Error("reload rejected: the kernel refused the new prefilter; the current policy stays in force", "config", cfg.File, "err", err)
		if err := d.dp.SetFilter(oldFilter); err != nil {
			d.log.Error("restore the prefilter", "err", err)
		}
		return
	}
	d.cfg.Store(cfg)
	d.applySteering(cfg)
	if err := d.dp.SetFilter(newFilter); err != nil {
		d.errors[errInstall].Add(1)
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
