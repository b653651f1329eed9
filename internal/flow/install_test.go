package flow

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// kernel records each transaction it accepts, and refuses any that holds
// a change of a refused flow (all or nothing, as nftables does).
type kernel struct {
	mu      sync.Mutex
	txs     [][]Change
	refuse  map[*Flow]bool
	applied []Change // every accepted change, in order
}

var errRefused = errors.New("refused")

func (k *kernel) Apply(cs []Change) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, c := range cs {
		if k.refuse[c.Flow] {
			return errRefused
		}
	}
	k.txs = append(k.txs, append([]Change(nil), cs...))
	k.applied = append(k.applied, cs...)
	return nil
}

type refusal struct {
	c   Change
	err error
}

func newInstaller(t *testing.T) (*Installer, *kernel, *[]refusal) {
	t.Helper()
	k := &kernel{refuse: map[*Flow]bool{}}
	var failed []refusal
	return NewInstaller(k, func(c Change, err error) { failed = append(failed, refusal{c, err}) }), k, &failed
}

func tcpFlow(port uint16) *Flow {
	return &Flow{Key: Key{Proto: ipproto.TCP, Src: netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port),
		Dst: netip.MustParseAddrPort("203.0.113.80:80")}}
}

func wire(port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("198.51.100.2"), port)
}

// A flow counts as installed only once the transaction with its elements
// is applied, and not before.
func TestInstalledOnlyAfterFlush(t *testing.T) {
	in, k, _ := newInstaller(t)
	f := tcpFlow(1000)
	if !in.Add(f, wire(1000)) {
		t.Fatal("not added")
	}
	if in.Installed(f) {
		t.Fatal("installed before any transaction")
	}
	if in.Table().Get(f.Key) != f {
		t.Fatal("not in the table while its elements are on their way")
	}
	in.Flush()
	if !in.Installed(f) || len(k.txs) != 1 {
		t.Fatalf("after Flush: installed %v, %d transactions", in.Installed(f), len(k.txs))
	}
}

// One refused change does not cost the others theirs: the batch is
// applied again one change at a time, the refused addition leaves the
// table (and is reported), and every other flow is installed.
func TestRefusedChangeAloneFails(t *testing.T) {
	in, k, failed := newInstaller(t)
	var fs []*Flow
	for i := range 5 {
		f := tcpFlow(uint16(1000 + i))
		in.Add(f, wire(uint16(1000+i)))
		fs = append(fs, f)
	}
	k.refuse[fs[2]] = true
	in.Flush()
	if len(*failed) != 1 || (*failed)[0].c.Flow != fs[2] || !errors.Is((*failed)[0].err, errRefused) {
		t.Fatalf("failures reported: %+v", *failed)
	}
	if in.Table().Get(fs[2].Key) != nil || in.Table().Len() != 4 {
		t.Fatalf("the refused flow is still in the table (%d flows)", in.Table().Len())
	}
	for i, f := range fs {
		if i != 2 && !in.Installed(f) {
			t.Errorf("flow %d not installed", i)
		}
	}
	if len(k.applied) != 4 {
		t.Fatalf("%d changes applied, want 4", len(k.applied))
	}
	// The tuple is free again: the socket's retransmission is decided anew.
	g := tcpFlow(1002)
	if !in.Add(g, wire(1002)) {
		t.Fatal("the refused flow's tuple stays taken")
	}
}

// A removal the kernel refuses is reported; the flow is out of the table
// either way.
func TestRefusedRemoval(t *testing.T) {
	in, k, failed := newInstaller(t)
	f := tcpFlow(1000)
	in.Add(f, wire(1000))
	in.Flush()
	k.refuse[f] = true
	if !in.Remove(f) || in.Remove(f) {
		t.Fatal("Remove must report true once, then false")
	}
	in.Flush()
	if len(*failed) != 1 || !(*failed)[0].c.Delete || in.Table().Len() != 0 {
		t.Fatalf("failures %+v, %d flows", *failed, in.Table().Len())
	}
}

// A removal and a new flow on the same tuple reach the kernel in that
// order, whether in one transaction or two.
func TestRemovalThenReuseInOrder(t *testing.T) {
	in, k, _ := newInstaller(t)
	old := tcpFlow(1000)
	in.Add(old, wire(1000))
	in.Flush()
	in.Remove(old)
	reuse := tcpFlow(1000)
	if !in.Add(reuse, wire(1000)) {
		t.Fatal("the tuple of a removed flow is not free")
	}
	in.Flush()
	a := k.applied
	if len(a) != 3 || a[1].Flow != old || !a[1].Delete || a[2].Flow != reuse || a[2].Delete {
		t.Fatalf("kernel saw %v", describe(a))
	}
	if len(k.txs) != 2 {
		t.Fatalf("%d transactions, want 2 (the removal and the new flow share one)", len(k.txs))
	}
}

// More changes than one transaction holds go in as many transactions as
// needed, in order, all by the time Flush returns.
func TestFlushSplitsLargeBatches(t *testing.T) {
	in, k, _ := newInstaller(t)
	n := MaxBatch*2 + 10
	var last *Flow
	for i := range n {
		last = tcpFlow(uint16(1000 + i))
		in.Add(last, wire(uint16(1000+i)))
	}
	in.Flush()
	if len(k.txs) != 3 || len(k.txs[0]) != MaxBatch || len(k.txs[2]) != 10 || !in.Installed(last) {
		t.Fatalf("%d transactions (%d, ...), last installed %v", len(k.txs), len(k.txs[0]), in.Installed(last))
	}
	for i, c := range k.applied {
		if c.Flow.Src.Port() != uint16(1000+i) {
			t.Fatalf("change %d out of order: %v", i, c.Flow.Src)
		}
	}
}

// Workers flush concurrently: when any Flush returns, every change
// enqueued before it is applied, even those another Flush took.
func TestConcurrentFlushes(t *testing.T) {
	in, k, _ := newInstaller(t)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 200 {
				f := tcpFlow(uint16(w*1000 + i + 1))
				in.Add(f, wire(uint16(w*1000+i+1)))
				in.Flush()
				if !in.Installed(f) {
					t.Errorf("worker %d: flow %d not installed when its Flush returned", w, i)
					return
				}
			}
		}()
	}
	wg.Wait()
	if len(k.applied) != 800 {
		t.Fatalf("%d changes applied, want 800", len(k.applied))
	}
}

func describe(cs []Change) string {
	s := ""
	for _, c := range cs {
		op := "add"
		if c.Delete {
			op = "del"
		}
		s += fmt.Sprintf("%s %p %v; ", op, c.Flow, c.Flow.Src)
	}
	return s
}

// Removals of flows whose sockets are gone (RemoveSoon) share one
// transaction: Run applies them together once SoonDelay has passed since
// the first, while a plain Remove is applied at once, and takes the
// waiting ones along, in order.
func TestRemoveSoonShares(t *testing.T) {
	in, k, _ := newInstaller(t)
	var fs []*Flow
	for p := uint16(1000); p < 1004; p++ {
		f := tcpFlow(p)
		in.Add(f, wire(p))
		fs = append(fs, f)
	}
	in.Flush()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go in.Run(ctx)
	txs := func() int { k.mu.Lock(); defer k.mu.Unlock(); return len(k.txs) }
	for _, f := range fs[:3] {
		if !in.RemoveSoon(f) || in.Table().Get(f.Key) != nil {
			t.Fatal("a flow removed soon stays in the table")
		}
	}
	deadline := time.Now().Add(10 * SoonDelay)
	for txs() == 1 && time.Now().Before(deadline) {
		time.Sleep(SoonDelay / 10)
	}
	if n := txs(); n != 2 || len(k.txs[1]) != 3 {
		t.Fatalf("%d transactions, the last of %d changes; want the three removals in one", n, len(k.txs[len(k.txs)-1]))
	}

	// A plain removal goes at once and takes a waiting one along.
	in.RemoveSoon(fs[3])
	g := tcpFlow(1000)
	in.Add(g, wire(1000))
	in.Flush()
	last := k.txs[len(k.txs)-1]
	if len(last) != 2 || last[0].Flow != fs[3] || !last[0].Delete || last[1].Flow != g || last[1].Delete {
		t.Fatalf("the flush after a removal soon applied %s; want the removal, then the addition", describe(last))
	}
}
