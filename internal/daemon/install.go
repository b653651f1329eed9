package daemon

import (
	"context"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/nftdp"
)

// installer owns the ordering rule: a flow's elements are installed
// before its first packet is released, and every change to the kernel's
// flow maps reaches the kernel in the order the flow table saw it, in as
// few transactions as possible.
//
// It is the only writer of the flow table (anyone may read it): add and
// remove change the table and enqueue the kernel change as one step, under
// mu, so that a removal and a later flow with the same tuple reach the
// kernel in that order. (One write is not under mu: a flow whose elements
// the kernel refused leaves the table from flush, under flushMu, which
// exclusive takes after mu. It needs no kernel change to order.) Whoever needs the changes applied calls flush: a
// worker before it releases the first packets of a burst, the installer's
// goroutine for removals. installed tells whether a flow's elements are in.
type installer struct {
	d     *Daemon
	flows *flow.Table
	mu    sync.Mutex // a flow table change and its kernel change are one step
	ops   chan flowOp
	next  uint64        // sequence of the last enqueued op; under mu
	done  atomic.Uint64 // sequence of the last applied op
	kick  chan struct{}

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

func newInstaller(d *Daemon, flows *flow.Table) *installer {
	in := &installer{d: d, flows: flows, ops: make(chan flowOp, 1<<16), kick: make(chan struct{}, 1)}
	if v := os.Getenv(testDelayEnv); v != "" {
		in.delay, _ = time.ParseDuration(v)
	}
	return in
}

// add puts f in the table with wire source src, and its elements in the
// queue of kernel changes, unless the socket tuple or the wire tuple is
// taken.
func (in *installer) add(f *flow.Flow, src netip.AddrPort) bool {
	f.NewSrc = src
	in.mu.Lock()
	defer in.mu.Unlock()
	// Before the table publishes f: a worker that finds f holds its
	// packets until this change is applied (installed).
	f.Seq = in.next + 1
	if !in.flows.Reserve(f) {
		return false
	}
	in.enqueue(f, false)
	return true
}

// adopt puts f, whose elements an earlier run left in the kernel, in the
// table, unless its tuples are taken.
func (in *installer) adopt(f *flow.Flow) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.flows.Reserve(f)
}

// remove takes f out of the table and, in order, its elements out of the
// kernel. It reports whether f was in the table.
func (in *installer) remove(f *flow.Flow) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	removed := in.flows.Remove(f)
	if removed {
		in.enqueue(f, true)
	}
	return removed
}

// installed reports whether f's elements are in the kernel: whether its
// packets may go.
func (in *installer) installed(f *flow.Flow) bool { return f.Seq <= in.done.Load() }

// exclusive runs fn with the flow table and the kernel's maps to itself: no
// flow comes or goes and no transaction interleaves.
func (in *installer) exclusive(fn func()) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.flushMu.Lock()
	defer in.flushMu.Unlock()
	fn()
}

// enqueue schedules a change. Call with mu held.
func (in *installer) enqueue(f *flow.Flow, del bool) {
	in.next++
	in.ops <- flowOp{f: f, del: del, seq: in.next}
	if del {
		select {
		case in.kick <- struct{}{}:
		default:
		}
	}
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
	in.flows.Remove(f) // its elements are not in the kernel: nothing to enqueue
}
