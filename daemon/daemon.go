// Package daemon is rerouted's daemon: it receives the first packet of every
// new locally originated TCP connection, decides its uplink, installs the
// flow's translation in the kernel, and removes it when the socket is gone.
//
// Goroutines and what each owns:
//   - the queue goroutine runs the packet path (packet.go); it owns the
//     sock_diag socket for exact lookups and the rtnetlink socket;
//   - the sweeper owns a second sock_diag socket for dumps;
//   - the control server answers `rerouted flows`.
//
// The nftables socket belongs to the Datapath, which serialises
// transactions; d.mu orders flow creation against removal so that a removal
// can never delete the kernel entries of a newer flow with the same tuple.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rerouted/rerouted/flow"
	"github.com/rerouted/rerouted/nftdp"
	"github.com/rerouted/rerouted/policy"
	"github.com/rerouted/rerouted/queue"
	"github.com/rerouted/rerouted/sockdiag"
	"golang.org/x/sys/unix"
)

// Options configure a daemon run.
type Options struct {
	Config *policy.Config
	Log    *slog.Logger
	Events io.Writer       // one line per translated flow created or removed; nil for none
	Reload <-chan struct{} // each receive reloads the configuration file (SIGHUP)
}

// Daemon is one running instance.
type Daemon struct {
	cfg    atomic.Pointer[policy.Config] // swapped whole on reload
	log    *slog.Logger
	events *eventWriter
	dp     *nftdp.Datapath
	q      *queue.Queue
	flows  *flow.Table
	mu     sync.Mutex // orders flow creation (packet path) against removal

	// Owned by the packet goroutine.
	diag           *sockdiag.Conn
	routes         *router
	owner          sockOwner   // the socket being decided
	query          policy.Flow // the flow being decided (reused: no allocation)
	portLo, portHi uint16
}

// queueRcvbuf is the NFQUEUE socket buffer: bursts of new connections must
// not overflow it (DESIGN-NOTES: a large SO_RCVBUFFORCE fixed drops).
const queueRcvbuf = 8 << 20

// Run runs the daemon until ctx is done, then removes everything it
// installed. It returns once the host is back as it found it.
func Run(ctx context.Context, o Options) (err error) {
	d := &Daemon{log: o.Log, flows: flow.NewTable()}
	d.cfg.Store(o.Config)
	d.owner.owners = sockdiag.NewOwners()
	if o.Events != nil {
		d.events = &eventWriter{w: o.Events}
	}
	if err := checkUplinks(o.Config); err != nil {
		return err
	}
	if d.portLo, d.portHi, err = localPortRange(); err != nil {
		return err
	}
	cfg := o.Config
	var undo []func() error // teardown, run in reverse
	defer func() {
		for i := len(undo) - 1; i >= 0; i-- {
			err = errors.Join(err, undo[i]())
		}
	}()

	if d.diag, err = sockdiag.Open(); err != nil {
		return err
	}
	undo = append(undo, d.diag.Close)
	sweepDiag, err := sockdiag.Open()
	if err != nil {
		return err
	}
	undo = append(undo, sweepDiag.Close)
	if d.routes, err = newRouter(); err != nil {
		return err
	}
	undo = append(undo, func() error { d.routes.close(); return nil })

	ctl, err := listenControl(cfg.Daemon.ControlSocket)
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

	if d.dp, err = nftdp.Install(cfg.Daemon.Queue); err != nil {
		return err
	}
	if d.dp.Replaced {
		d.log.Warn("removed a table left by an earlier run; its flows are no longer translated", "table", "inet "+nftdp.TableName)
	}
	undo = append(undo, func() error {
		n := d.flows.Len()
		err := d.dp.Remove()
		d.log.Info("removed table", "table", "inet "+nftdp.TableName, "flows", n)
		return err
	})

	if d.q, err = queue.Open(cfg.Daemon.Queue, queueRcvbuf); err != nil {
		return err
	}
	undo = append(undo, d.q.Close)

	var wg sync.WaitGroup
	runCtx, stop := context.WithCancel(ctx)
	undo = append(undo, func() error { stop(); wg.Wait(); return nil })
	wg.Add(3)
	go func() { defer wg.Done(); d.sweepLoop(runCtx, sweepDiag) }()
	go func() { defer wg.Done(); d.serveControl(runCtx, ctl) }()
	go func() { defer wg.Done(); d.reloadLoop(runCtx, o.Reload) }()

	// Bind before announcing readiness: "ready" means new connections are
	// translated, not passed by the queue's bypass.
	if err := d.q.Start(runCtx, d.handle, func(err error) { d.log.Error("nfqueue receive", "err", err) }); err != nil {
		return err
	}
	d.log.Info("ready", "config", cfg.File, "queue", cfg.Daemon.Queue, "queue_method", d.dp.QueueMethod,
		"table", "inet "+nftdp.TableName, "honor_marks", cfg.Daemon.HonorMarks, "uplinks", len(cfg.Uplinks),
		"rules", len(cfg.Rules), "control_socket", cfg.Daemon.ControlSocket)
	<-ctx.Done()
	d.log.Info("stopping")
	return nil
}

// checkUplinks verifies the interfaces the configuration names exist.
func checkUplinks(cfg *policy.Config) error {
	for _, u := range cfg.Uplinks {
		if u.Interface == "" {
			continue
		}
		if _, err := net.InterfaceByName(u.Interface); err != nil {
			return fmt.Errorf("uplink %q: interface %q: %w", u.Name, u.Interface, err)
		}
	}
	return nil
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
		old := d.cfg.Load()
		cfg, err := policy.Load(old.File)
		if err == nil {
			err = checkUplinks(cfg)
		}
		if err != nil {
			var es policy.Errors
			if errors.As(err, &es) {
				for _, e := range es {
					d.log.Error("reload: " + e.Error())
				}
			}
			d.log.Error("reload rejected; the current policy stays in force", "config", old.File, "err", err)
			continue
		}
		if cfg.Daemon != old.Daemon {
			d.log.Warn("reload: [daemon] settings take effect at the next start", "config", cfg.File)
			cfg.Daemon = old.Daemon
		}
		d.cfg.Store(cfg)
		d.log.Info("reloaded", "config", cfg.File, "uplinks", len(cfg.Uplinks), "rules", len(cfg.Rules))
	}
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

// sweepLoop removes flows whose socket is gone. A dump (not destroy
// notifications) is what shows TIME_WAIT sockets, which still own their tuple.
func (d *Daemon) sweepLoop(ctx context.Context, diag *sockdiag.Conn) {
	t := time.NewTicker(d.cfg.Load().Daemon.GCInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if d.flows.Len() == 0 {
			continue
		}
		s := d.flows.BeginSweep(time.Now())
		err := diag.Dump(unix.AF_INET, unix.IPPROTO_TCP, func(so *sockdiag.Socket) {
			s.Seen(flow.Key{Proto: unix.IPPROTO_TCP, Src: so.Local, Dst: so.Remote}, so.Cookie)
		})
		if err != nil {
			// An incomplete dump must not be taken as "sockets gone".
			d.log.Error("socket dump failed; no flow removed this round", "err", err)
			continue
		}
		d.mu.Lock()
		dead := s.End()
		d.removeKernel(dead)
		d.mu.Unlock()
		for _, f := range dead {
			d.events.write("DESTROY", f)
		}
	}
}

// removeKernel deletes the kernel entries of flows already taken out of the
// table. Called with d.mu held.
func (d *Daemon) removeKernel(fs []*flow.Flow) {
	if len(fs) == 0 {
		return
	}
	es := make([]nftdp.Entry, len(fs))
	for i, f := range fs {
		es[i] = entry(f)
	}
	if err := d.dp.Delete(es...); err == nil {
		return
	}
	// One bad element fails the whole transaction: retry one by one so the
	// others still go, and name the one that failed.
	for _, e := range es {
		if err := d.dp.Delete(e); err != nil {
			d.log.Error("remove flow from kernel", "src", e.Src, "dst", e.Dst, "err", err)
		}
	}
}

func entry(f *flow.Flow) nftdp.Entry {
	return nftdp.Entry{Src: f.Src, Dst: f.Dst, NewSrc: f.NewSrc, Mark: f.Mark}
}
