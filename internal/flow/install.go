package flow

import (
	"context"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
)

// Installer owns the ordering rule, and this is where it is explained;
// other comments refer here.
//
// The ordering rule: a flow's kernel state (its elements) is installed
// before its first packet is released, and every change to the kernel's
// flow maps reaches the kernel in the order the table saw it, in as few
// transactions as possible.
//
// Why: once the first packet (a SYN, a datagram) leaves with the new
// source, the peer's reply can come back at once, and only the flow's
// elements turn it back into the socket's tuple; a reply that arrives
// before them finds no socket on the wire tuple (a SYN-ACK is answered
// with a reset). The flow's later packets, too, are translated by the
// elements on the kernel datapath; one that left before them would leave
// with the socket's own source. And a removal followed by a new flow on
// the same tuple must reach the kernel in that order, or the new flow's
// elements would be deleted.
//
// How: the installer is the only writer of its table (anyone may read
// it): Add and Remove change the table and enqueue the kernel change as
// one step, under mu, so that changes are enqueued in table order. (One
// write is not under mu: a flow whose kernel state the kernel refused
// leaves the table from Flush, under flushMu, which Exclusive takes after
// mu. It needs no kernel change to order.) Whoever needs the changes
// applied calls Flush: a packet worker before it releases the first
// packets of a burst (it holds them until then), Run for removals.
// Installed tells whether a flow's state is in, so that a later packet of
// a flow whose elements are on their way waits too.
type Installer struct {
	table  *Table
	kernel Kernel
	failed func(Change, error)

	mu   sync.Mutex // a table change and its kernel change are one step
	ops  chan Change
	next uint64        // sequence of the last enqueued change; under mu
	done atomic.Uint64 // sequence of the last applied change
	kick chan struct{}

	flushMu sync.Mutex // one transaction at a time, in order
	batch   []Change

	soon chan struct{} // a removal that may wait for others (RemoveSoon)
}

// Change is one flow entering (Delete false) or leaving the kernel.
type Change struct {
	Flow   *Flow
	Delete bool
	seq    uint64
}

// Kernel applies a batch of changes in one transaction, all or nothing.
// The slice is reused after Apply returns.
type Kernel interface {
	Apply([]Change) error
}

// MaxBatch bounds one transaction.
const MaxBatch = 1024

// NewInstaller returns the installer of flows into k, with its table,
// empty. failed is told of each change the kernel refused, after a refused
// addition has left the table (its packets are dropped, and the socket's
// retransmission is decided again).
func NewInstaller(k Kernel, failed func(Change, error)) *Installer {
	return &Installer{table: newTable(), kernel: k, failed: failed, ops: make(chan Change, 1<<16), kick: make(chan struct{}, 1),
		soon: make(chan struct{}, 1)}
}

// Table is the installer's table, for reading: the one handle on it.
func (in *Installer) Table() *Table { return in.table }

// Add puts f in the table with wire source src, and its kernel state in
// the queue of changes, unless the socket tuple or the wire tuple is taken.
func (in *Installer) Add(f *Flow, src netip.AddrPort) bool {
	f.NewSrc = src
	in.mu.Lock()
	defer in.mu.Unlock()
	// Before the table publishes f: a worker that finds f holds its
	// packets until this change is applied (Installed).
	f.Seq = in.next + 1
	if !in.table.reserve(f) {
		return false
	}
	in.enqueue(f, false)
	return true
}

// Adopt puts f, whose kernel state an earlier run left in the kernel, in
// the table, unless its tuples are taken.
func (in *Installer) Adopt(f *Flow) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.table.reserve(f)
}

// Remove takes f out of the table and, in order, its state out of the
// kernel. It reports whether f was in the table.
func (in *Installer) Remove(f *Flow) bool {
	return in.remove(f, in.kick)
}

// SoonDelay is how long RemoveSoon lets a removal wait for others.
const SoonDelay = 50 * time.Millisecond

// RemoveSoon is Remove for a flow whose socket is gone, with nothing of
// it to come but retransmissions: its kernel change waits up to SoonDelay
// to share a transaction with others (a host whose connections end by
// thousands a second would otherwise commit a transaction for each), or
// goes with the next change applied, whichever is first.
func (in *Installer) RemoveSoon(f *Flow) bool {
	return in.remove(f, in.soon)
}

func (in *Installer) remove(f *Flow, kick chan struct{}) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	removed := in.table.remove(f)
	if removed {
		in.enqueue(f, true)
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	return removed
}

// Installed reports whether f's kernel state is in: whether its packets
// may go.
func (in *Installer) Installed(f *Flow) bool { return f.Seq <= in.done.Load() }

// Exclusive runs fn with the table and the kernel's maps to itself: no flow
// comes or goes and no transaction interleaves.
func (in *Installer) Exclusive(fn func()) {
	in.mu.Lock()
	defer in.mu.Unlock()
	in.flushMu.Lock()
	defer in.flushMu.Unlock()
	fn()
}

// enqueue schedules a change. Call with mu held.
func (in *Installer) enqueue(f *Flow, del bool) {
	in.next++
	in.ops <- Change{Flow: f, Delete: del, seq: in.next}
}

// Run applies removals as they come (those of RemoveSoon within
// SoonDelay), until ctx is done; additions are flushed by whoever holds
// their packets.
func (in *Installer) Run(ctx context.Context) {
	var soon <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-in.kick:
			in.Flush()
		case <-in.soon:
			if soon == nil {
				soon = time.After(SoonDelay)
			}
		case <-soon:
			soon = nil
			in.Flush()
		}
	}
}

// Flush applies every change enqueued so far. When it returns, Installed
// covers all of them: a concurrent Flush that took some of them finished
// first.
func (in *Installer) Flush() {
	in.flushMu.Lock()
	defer in.flushMu.Unlock()
	for {
		in.batch = in.batch[:0]
	drain:
		for len(in.batch) < MaxBatch {
			select {
			case c := <-in.ops:
				in.batch = append(in.batch, c)
			default:
				break drain
			}
		}
		if len(in.batch) == 0 {
			return
		}
		in.apply()
		if len(in.batch) < MaxBatch {
			return
		}
	}
}

func (in *Installer) apply() {
	if err := in.kernel.Apply(in.batch); err != nil {
		// One bad change fails the whole transaction: apply them one by
		// one so the others still go, and name the one that failed.
		for i, c := range in.batch {
			if err := in.kernel.Apply(in.batch[i : i+1]); err != nil {
				if !c.Delete {
					in.table.remove(c.Flow) // not in the kernel: nothing to enqueue
				}
				in.failed(c, err)
			}
		}
	}
	in.done.Store(in.batch[len(in.batch)-1].seq)
}
