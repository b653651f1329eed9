package nftdp

import (
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
	"github.com/rerouted/rerouted/internal/nftdp/prefilter"
)

// BenchmarkFlowTransaction is one new TCP flow's elements added and removed,
// each in its own transaction: the kernel work a new connection costs.
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
