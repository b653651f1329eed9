package packet

import (
	"fmt"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/queue"
	"github.com/rerouted/rerouted/internal/rewrite"
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/uplink"
)

// loopbackConn makes one loopback connection owned by this process and
// returns its tuple (nothing outside the loopback interface is touched).
func loopbackConn(tb testing.TB) (local, remote netip.AddrPort) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	go func() {
		if c, err := ln.Accept(); err == nil {
			tb.Cleanup(func() { c.Close() })
		}
	}()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { c.Close() })
	return c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort()
}

const benchUplinks = "[[uplink]]\nname = \"b\"\nmark = 100\n"

// Ten rules of the cheap kind, none matching, then a match: the decision
// walks them all.
func benchPolicy(tb testing.TB, last string) *policy.Config {
	src := benchUplinks
	for i := 0; i < 10; i++ {
		src += fmt.Sprintf("[[rule]]\nuplink = \"b\"\ndst = [\"203.0.113.%d/32\"]\ndport = [%d, \"9000-9100\"]\nuid = %d\n", i, 1000+i, 2000+i)
	}
	cfg, err := policy.Parse("bench.toml", []byte(src+"[[rule]]\nname = \"last\"\nuplink = \"b\"\n"+last))
	if err != nil {
		tb.Fatal(err)
	}
	return cfg
}

type decideCase struct {
	name string
	last string // the matching rule's keys
	// owners: a fresh owner scanner before each decision ("cold": nothing
	// known), or one that has just found this process as the owner of
	// another socket ("recent": the state for a process's next socket).
	owners string
}

var decideCases = []decideCase{
	{"cheap rules", "dport = \"1-65535\"\n", ""},
	{"process rule, recent owner", "process = [\"nomatch\", \"%s\"]\n", "recent"},
	{"process rule, cold /proc scan", "process = [\"nomatch\", \"%s\"]\n", "cold"},
	{"cgroup rule", "cgroup = \"\"\n", ""},
}

// prepare puts w's owner scanner in the state c asks for; other is
// another socket of this process.
func (c decideCase) prepare(tb testing.TB, w *Worker, cfg *policy.Config, other [2]netip.AddrPort) {
	if c.owners == "" {
		return
	}
	w.owner.owners = owner.NewOwners()
	if c.owners == "recent" {
		if _, err := decideOnce(w, cfg, other[0], other[1]); err != nil {
			tb.Fatal(err)
		}
	}
}

// decideOnce runs the decision path for one new connection: the exact
// socket lookup and the policy with its lazy owner lookups.
func decideOnce(w *Worker, cfg *policy.Config, local, remote netip.AddrPort) (string, error) {
	sock, err := w.diag.Lookup(ipproto.TCP, local, remote)
	if err != nil {
		return "", err
	}
	_, rule, _ := w.decide(cfg, &sock, &queue.Packet{}, &rewrite.Packet{Proto: ipproto.TCP, Src: local, Dst: remote}, false)
	return rule, nil
}

// newDecider is a worker with a real sock_diag socket and /proc scanner
// (no root needed: the sockets are this process's own).
func newDecider(tb testing.TB) *Worker {
	diag, err := sockdiag.Open()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { diag.Close() })
	return NewWorker(&Shared{Uplinks: &uplink.States{}, Balance: &uplink.Balancer{}}, nil, diag, nil, owner.NewOwners())
}

func TestDecideMatchesEachCase(t *testing.T) {
	local, remote := loopbackConn(t)
	var other [2]netip.AddrPort
	other[0], other[1] = loopbackConn(t)
	d := newDecider(t)
	comm, _ := os.ReadFile("/proc/self/comm")
	for _, c := range decideCases {
		cfg := benchPolicy(t, strings.ReplaceAll(c.last, "%s", string(comm[:len(comm)-1])))
		c.prepare(t, d, cfg, other)
		if rule, err := decideOnce(d, cfg, local, remote); err != nil || rule != "last" {
			t.Errorf("%s: decided %q, err %v", c.name, rule, err)
		}
	}
}

func TestDecideAllocatesNothingWithoutOwnerKeys(t *testing.T) {
	local, remote := loopbackConn(t)
	d := newDecider(t)
	cfg := benchPolicy(t, decideCases[0].last)
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := decideOnce(d, cfg, local, remote); err != nil {
			panic(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("decision allocates %.1f times", allocs)
	}
}

// BenchmarkDecide reports the median and 99th percentile of one decision.
// Informational: the latencies are compared to nothing; the floor is
// TestDecideAllocatesNothingWithoutOwnerKeys.
func BenchmarkDecide(b *testing.B) {
	local, remote := loopbackConn(b)
	var other [2]netip.AddrPort
	other[0], other[1] = loopbackConn(b)
	comm, _ := os.ReadFile("/proc/self/comm")
	for _, c := range decideCases {
		b.Run(c.name, func(b *testing.B) {
			d := newDecider(b)
			cfg := benchPolicy(b, strings.ReplaceAll(c.last, "%s", string(comm[:len(comm)-1])))
			lat := make([]time.Duration, 0, b.N)
			for b.Loop() {
				c.prepare(b, d, cfg, other)
				t0 := time.Now()
				if _, err := decideOnce(d, cfg, local, remote); err != nil {
					b.Fatal(err)
				}
				lat = append(lat, time.Since(t0))
			}
			slices.Sort(lat)
			b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "p50-ns")
			b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
			// The decision's own allocations, in a pass of their own (reading
			// the counts stops the world, which the latencies must not see),
			// and without prepare's (a fresh owner scanner, a decision about
			// another socket), which allocs/op would count.
			var before, after runtime.MemStats
			var mallocs uint64
			const passes = 100
			for range passes {
				c.prepare(b, d, cfg, other)
				runtime.ReadMemStats(&before)
				if _, err := decideOnce(d, cfg, local, remote); err != nil {
					b.Fatal(err)
				}
				runtime.ReadMemStats(&after)
				mallocs += after.Mallocs - before.Mallocs
			}
			b.ReportMetric(float64(mallocs)/passes, "decision-allocs/op")
		})
	}
}
