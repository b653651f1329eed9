package flow

import (
	"net/netip"
	"runtime"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/owner"
)

// discard is a kernel that accepts every transaction and keeps nothing.
type discard struct{}

func (discard) Apply([]Change) error { return nil }

// The heap the flow table keeps for 100,000 translated TCP flows, each
// with its owner (what the daemon holds at the benchmark's scale, whose
// whole process BENCHMARKS.md measures at ~50–58 MiB): a ceiling on
// runtime.MemStats' live heap after building it, a count not a time. It
// measures ~40 MiB (about 420 bytes a flow, the two indexes' maps
// included); 56 MiB (1.4×) catches another index or a few more fields per
// flow, or the maps going back to pointerful keys.
func TestHeap100kFlows(t *testing.T) {
	const n = 100_000
	const ceiling = 56 << 20
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	in := NewInstaller(discard{}, func(Change, error) {})
	src := netip.MustParseAddr("198.51.100.2")
	newSrc := netip.MustParseAddr("203.0.113.2")
	dst := netip.MustParseAddrPort("192.0.2.80:443")
	ow := &Owner{Process: owner.Process{PID: 4242, Comm: "curl", Exe: "/usr/bin/curl"}, Cgroup: "/system.slice/backup.service"}
	start := time.Now()
	for i := range n {
		port := uint16(1024 + i%60000)
		d := dst
		if i >= 60000 {
			d = netip.MustParseAddrPort("192.0.2.81:443")
		}
		f := &Flow{Key: Key{Proto: ipproto.TCP, Src: netip.AddrPortFrom(src, port), Dst: d},
			Mark: 100, MSS: 1460, Dev: "hb", Rule: "backups", UID: 1000, Owner: ow, Cookie: uint64(i + 1), Inode: uint32(i + 1), Start: start}
		if !in.Add(f, netip.AddrPortFrom(newSrc, port)) {
			t.Fatalf("flow %d not added", i)
		}
		if i%1000 == 999 {
			in.Flush()
		}
	}
	in.Flush()
	runtime.GC()
	runtime.ReadMemStats(&after)
	if got := in.Table().Len(); got != n {
		t.Fatalf("%d flows in the table, want %d", got, n)
	}
	heap := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	runtime.KeepAlive(in)
	t.Logf("%d flows: %.1f MiB of heap (%d bytes a flow)", n, float64(heap)/(1<<20), heap/n)
	if heap > ceiling {
		t.Errorf("%d flows keep %.1f MiB of heap, ceiling %d MiB", n, float64(heap)/(1<<20), ceiling>>20)
	}
}
