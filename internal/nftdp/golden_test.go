package nftdp

import (
	"encoding/hex"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/nftdp/nftbatch"
)

var update = flag.Bool("update", false, "rewrite the golden netlink batches in testdata")

// goldenDatapath is the datapath's description, without sockets: what the
// hand-built batches are made from.
func goldenDatapath(t *testing.T, userspace bool) *Datapath {
	d := &Datapath{table: &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}, userspace: userspace, seenFor: 2 * time.Minute}
	d.defineFamilies()
	if err := d.defineSets(); err != nil {
		t.Fatal(err)
	}
	return d
}

// The hand-built nftables batches, byte for byte: the per-flow
// transaction (additions and deletions, translations and passes, both
// families), the rules, and the maps of marks.
func TestGoldenBatches(t *testing.T) {
	d := goldenDatapath(t, false)
	tcp4 := Entry{Proto: ipproto.TCP, Src: ap("198.51.100.2:40312"), Dst: ap("192.0.2.80:80"), NewSrc: ap("203.0.113.2:40313"), Mark: 100}
	udp6 := Entry{Proto: ipproto.UDP, Src: ap("[2001:db8::2]:5353"), Dst: ap("[2001:db8:1::53]:53"), NewSrc: ap("[2001:db8:2::2]:5354"), Mark: 0x72720002}
	echo4 := Entry{Proto: ipproto.ICMP, Src: ap("198.51.100.2:7"), Dst: ap("192.0.2.1:7"), NewSrc: ap("203.0.113.2:7"), Mark: 101}
	pass4 := Entry{Proto: ipproto.UDP, Src: ap("198.51.100.2:1000"), Dst: ap("192.0.2.53:53"), Pass: true}
	ops := []Op{{Entry: tcp4}, {Entry: udp6}, {Entry: echo4}, {Entry: pass4}, {Entry: tcp4, Delete: true}, {Entry: pass4, Delete: true}}

	var marks []*nftables.Set
	for i := range d.fams {
		for j := range d.fams[i].protos {
			if m := d.fams[i].protos[j].outMark; m != nil {
				marks = append(marks, m)
			}
		}
	}
	batches := map[string]func(w *nftbatch.Writer) ([]byte, uint32){
		"flows": func(w *nftbatch.Writer) ([]byte, uint32) { return flowBatch(w, ops, d.proto) },
		"rules": func(w *nftbatch.Writer) ([]byte, uint32) {
			return w.Rules(d.rules(3, 2, true), []string{"output", "prerouting"})
		},
		"mark-maps": func(w *nftbatch.Writer) ([]byte, uint32) { return w.HostDataMaps(marks) },
	}
	for name, build := range batches {
		b, last := build(&nftbatch.Writer{Table: TableName})
		got := hexLines(b, last)
		path := filepath.Join("testdata", "batch-"+name+".hex")
		if *update {
			if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		want, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if got != string(want) {
			t.Errorf("%s: the batch changed (go test ./internal/nftdp -run TestGoldenBatches -update rewrites it):\n got: %.400s\nwant: %.400s", name, got, want)
		}
	}
}

// Building a per-flow batch allocates nothing once the writer's buffer has
// grown: it is on every new flow's path, and nftbatch's messages are built
// from nftdp's keys across a package boundary.
func TestFlowBatchDoesNotAllocate(t *testing.T) {
	d := goldenDatapath(t, false)
	tcp4 := Entry{Proto: ipproto.TCP, Src: ap("198.51.100.2:40312"), Dst: ap("192.0.2.80:80"), NewSrc: ap("203.0.113.2:40313"), Mark: 100}
	udp6 := Entry{Proto: ipproto.UDP, Src: ap("[2001:db8::2]:5353"), Dst: ap("[2001:db8:1::53]:53"), NewSrc: ap("[2001:db8:2::2]:5354"), Mark: 100}
	ops := []Op{{Entry: tcp4}, {Entry: udp6}, {Entry: tcp4, Delete: true}}
	w := &nftbatch.Writer{Table: TableName}
	setsOf := d.proto
	flowBatch(w, ops, setsOf)
	if n := testing.AllocsPerRun(100, func() { flowBatch(w, ops, setsOf) }); n != 0 {
		t.Errorf("a per-flow batch costs %v allocations", n)
	}
}

// hexLines prints a batch 16 bytes a line, after the sequence number of the
// message acknowledged.
func hexLines(b []byte, last uint32) string {
	var s strings.Builder
	s.WriteString("last seq " + hex.EncodeToString([]byte{byte(last >> 24), byte(last >> 16), byte(last >> 8), byte(last)}) + "\n")
	for len(b) > 0 {
		n := min(16, len(b))
		s.WriteString(hex.EncodeToString(b[:n]) + "\n")
		b = b[n:]
	}
	return s.String()
}
