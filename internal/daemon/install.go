package daemon

import (
	"context"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/nftdp"
)

// installer applies every change to the kernel's flow maps, in the order the
// flow table saw them, as few transactions as possible.
//
// Changes are enqueued under Daemon.mu together with the flow table change,
// so that a removal and a later flow with the same tuple reach the kernel in
// that order. Whoever needs them applied calls flush: a worker before it
// releases the SYNs of a burst, the installer's goroutine for removals.
type installer struct {
	d    *Daemon
	ops  chan flowOp
	next uint64        // sequence of the last enqueued op; under Daemon.mu
	done atomic.Uint64 // sequence of the last applied op
	kick chan struct{}

	flushMu sync.Mutex // one transaction at a time, in order
	batch   []flowOp
	changes []nftdp.Op
	delay   time.Duration // tests only: see testDelayEnv
}

type flowOp struct {
	f   *flow.Flow
	del bool
	seq uint64
}

// testDelayEnv names a test-only setting: a delay before each transaction,
// to show that SYNs wait for their flow's elements.
const testDelayEnv = "REROUTED_TEST_INSTALL_DELAY"

func newInstaller(d *Daemon) *installer {
	in := &installer{d: d, ops: make(chan flowOp, 1<<16), kick: make(chan struct{}, 1)}
	if v := os.Getenv(testDelayEnv); v != "" {
		in.delay, _ = time.ParseDuration(v)
	}
	return in
}

// enqueue schedules a change and returns its sequence number. Call with
// Daemon.mu held.
func (in *installer) enqueue(f *flow.Flow, del bool) uint64 {
	in.next++
	in.ops <- flowOp{f: f, del: del, seq: in.next}
	if del {
		select {
		case in.kick <- struct{}{}:
		default:
		}
	}
	return in.next
}

// run applies removals as they come; additions are flushed by the workers.
func (in *installer) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-in.kick:
			in.flush()
		}
	}
}

// flush applies every change enqueued so far. When it returns, done covers
// all of them: a concurrent flush that took some of them finished first.
func (in *installer) flush() {
	in.flushMu.Lock()
	defer in.flushMu.Unlock()
	for {
		in.batch = in.batch[:0]
	drain:
		for len(in.batch) < maxBatch {
			select {
			case op := <-in.ops:
				in.batch = append(in.batch, op)
			default:
				break drain
			}
		}
		if len(in.batch) == 0 {
			return
		}
		in.apply()
		if len(in.batch) < maxBatch {
			return
		}
	}
}

// maxBatch bounds one transaction.
const maxBatch = 1024

func (in *installer) apply() {
	if in.delay > 0 {
		time.Sleep(in.delay)
	}
	in.changes = in.changes[:0]
	for _, op := range in.batch {
		in.changes = append(in.changes, nftdp.Op{Entry: entry(op.f), Delete: op.del})
	}
	if err := in.d.dp.Apply(in.changes); err != nil {
		// One bad change fails the whole transaction: apply them one by
		// one so the others still go, and name the one that failed.
		for i, op := range in.batch {
			if err := in.d.dp.Apply(in.changes[i : i+1]); err != nil {
				in.failed(op, err)
			}
		}
	}
	in.done.Store(in.batch[len(in.batch)-1].seq)
}

// failed handles a change the kernel refused. A flow whose elements could
// not be installed leaves the table; its SYN is dropped, and the socket's
// retransmission is decided again.
func (in *installer) failed(op flowOp, err error) {
	f := op.f
	if op.del && benignRemoval(err) {
		in.d.log.Debug("flow's elements were gone already", "src", f.Src, "dst", f.Dst)
		return
	}
	if op.del {
		in.d.stats.errors[errRemove].Add(1)
		in.d.log.Error("remove flow from kernel", "src", f.Src, "dst", f.Dst, "err", err)
		return
	}
	in.d.stats.errors[errInstall].Add(1)
	in.d.log.Error("install flow in kernel", "src", f.Src, "dst", f.Dst, "new_src", f.NewSrc, "err", err)
	in.d.flows.Remove(f)
}
