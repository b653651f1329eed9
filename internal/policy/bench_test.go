package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// bigListSizes are the dst list lengths the benchmarks compare: a decision
// must cost the same with either.
var bigListSizes = []int{5, 500_000}

// randomPrefixes returns n IPv4 prefixes, /24 to /32, inside 10.0.0.0/8:
// synthetic space, so that 192.0.2.0/24 (the flows' destinations) is never
// covered by chance. The seed is fixed so runs compare.
func randomPrefixes(n int) []netip.Prefix {
	rng := rand.New(rand.NewPCG(1, uint64(n)))
	ps := make([]netip.Prefix, n)
	for i := range ps {
		v := 10<<24 | rng.Uint32()&0xffffff
		a := netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
		ps[i] = netip.PrefixFrom(a, 24+rng.IntN(9)).Masked()
	}
	return ps
}

// bigListConfig is a policy whose first rule has ps (one per line, as a
// generated list is written) in its dst, then hit (if any) last, the worst
// place for a scan; the second rule takes everything else.
func bigListConfig(ps []netip.Prefix, hit string) []byte {
	var b strings.Builder
	b.Grow(len(ps) * 22)
	b.WriteString("[[uplink]]\nname = \"b\"\nmark = 100\n\n[[rule]]\nname = \"big\"\nuplink = \"default\"\ndst = [\n")
	for _, p := range ps {
		fmt.Fprintf(&b, "  %q,\n", p.String())
	}
	if hit != "" {
		fmt.Fprintf(&b, "  %q,\n", hit)
	}
	b.WriteString("]\n\n[[rule]]\nname = \"rest\"\nuplink = \"b\"\n")
	return []byte(b.String())
}

var bigConfigs sync.Map // "n/hit" → *Config, built once per process: parsing 500,000 entries is slow under -race

func bigListPolicy(tb testing.TB, n int, hit string) *Config {
	key := fmt.Sprintf("%d/%s", n, hit)
	if c, ok := bigConfigs.Load(key); ok {
		return c.(*Config)
	}
	cfg, err := Parse("big.toml", bigListConfig(randomPrefixes(n), hit))
	if err != nil {
		tb.Fatal(err)
	}
	bigConfigs.Store(key, cfg)
	return cfg
}

// BenchmarkDecideBigList: one decision against a rule whose dst has 5 or
// 500,000 prefixes; "miss" falls through to the next rule, "hit" matches
// the list's last entry. Informational: its times are compared to nothing;
// the floors are TestDecideBigListRatio and TestTrieMatchDoesNotAllocate.
func BenchmarkDecideBigList(b *testing.B) {
	for _, n := range bigListSizes {
		for _, c := range []struct{ name, hit, want string }{
			{"miss", "", "rest"},
			{"hit", "192.0.2.0/24", "big"},
		} {
			b.Run(fmt.Sprintf("cidrs=%d/%s", n, c.name), func(b *testing.B) {
				cfg := bigListPolicy(b, n, c.hit)
				f := &Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort("192.0.2.80:443"), HasUID: true}
				if r := cfg.Decide(f); r == nil || r.Name != c.want {
					b.Fatalf("decided %v, want rule %q", r, c.want)
				}
				b.ReportAllocs()
				b.ResetTimer()
				for b.Loop() {
					cfg.Decide(f)
				}
			})
		}
	}
}

// BenchmarkLoadBigList: policy.Load of a file whose one rule has 500,000
// prefixes in dst. heap-MB is what the loaded Config keeps alive.
// Informational: compared to nothing; the floors are TestLoadScalesLinearly
// and TestLoadBigList.
func BenchmarkLoadBigList(b *testing.B) {
	file := filepath.Join(b.TempDir(), "big.toml")
	if err := os.WriteFile(file, bigListConfig(randomPrefixes(500_000), ""), 0o600); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Load(file); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	cfg, err := Load(file)
	if err != nil {
		b.Fatal(err)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	runtime.KeepAlive(cfg)
	b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/(1<<20), "heap-MB")
}

// Loading a 500,000-entry list stays well inside its 2 s budget (the bound
// here is loose, for -race and busy machines: it catches a return to
// quadratic work, not a few per cent).
func TestLoadBigList(t *testing.T) {
	if testing.Short() {
		t.Skip("writes and parses a 12 MB file")
	}
	file := filepath.Join(t.TempDir(), "big.toml")
	if err := os.WriteFile(file, bigListConfig(randomPrefixes(500_000), "192.0.2.0/24"), 0o600); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	cfg, err := Load(file)
	took := time.Since(start)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("Load of 500,000 prefixes: %v", took)
	if took > 20*time.Second {
		t.Errorf("Load of 500,000 prefixes took %v, budget 2 s (20 s allowed here)", took)
	}
	f := &Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort("192.0.2.80:443"), HasUID: true}
	if r := cfg.Decide(f); r == nil || r.Name != "big" {
		t.Fatalf("decided %v, want rule \"big\"", r)
	}
}
