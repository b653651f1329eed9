package nftdp

import (
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
	"github.com/rerouted/rerouted/internal/nftdp/prefilter"
)

// BenchmarkFlowTransaction is one new TCP flow's elements added and removed,
// each in its own transaction: the kernel work a new connection costs.
// Informational: its time is compared to nothing; the floor is
// TestFlowTransactionAllocs.
func BenchmarkFlowTransaction(b *testing.B) {
	ns := worldtest.NS(b)
	var d *Datapath
	if err := ns.Do(func() (err error) { d, err = Install(0, 1, false, 0, prefilter.Filter{}); return err }); err != nil {
		b.Fatal(err)
	}
	defer d.Remove()
	e := Entry{Proto: ipproto.TCP, Src: ap("198.51.100.2:40312"), Dst: ap("192.0.2.80:80"), NewSrc: ap("203.0.113.2:40312"), Mark: 100}
	b.ReportAllocs()
	for b.Loop() {
		if err := d.Add(e); err != nil {
			b.Fatal(err)
		}
		if err := d.Delete(e); err != nil {
			b.Fatal(err)
		}
	}
}

// The floor under BenchmarkFlowTransaction: the allocations of one flow's
// elements added and removed, each in its own transaction (a count, which
// a slower or busier machine does not change). It measures 2 today (the
// netlink round trips' own); a ceiling of 4 catches a per-flow copy or
// buffer more, which the batch builder's own test (TestFlowBatchDoesNotAllocate)
// would not see outside it.
func TestFlowTransactionAllocs(t *testing.T) {
	ns := worldtest.NS(t)
	var d *Datapath
	if err := ns.Do(func() (err error) { d, err = Install(0, 1, false, 0, prefilter.Filter{}); return err }); err != nil {
		t.Fatal(err)
	}
	defer d.Remove()
	e := Entry{Proto: ipproto.TCP, Src: ap("198.51.100.2:40312"), Dst: ap("192.0.2.80:80"), NewSrc: ap("203.0.113.2:40312"), Mark: 100}
	var err error
	allocs := testing.AllocsPerRun(200, func() {
		if err == nil {
			err = d.Add(e)
		}
		if err == nil {
			err = d.Delete(e)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("one flow added and removed: %.1f allocations", allocs)
	if allocs > 4 {
		t.Errorf("one flow added and removed costs %.1f allocations, ceiling 4", allocs)
	}
}
