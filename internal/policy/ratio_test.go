package policy

import (
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// The floors under BenchmarkLoadBigList and BenchmarkDecideBigList: what
// they measure, as ratios that hold on any machine, under -race too,
// rather than times.

// Loading a list ten times as long costs about ten times the work: the
// allocations (a count, exact from run to run) of Load for 500,000 and
// 50,000 prefixes are in a ratio of 10 (linear work). Quadratic work would
// be 100; a bound of 20 catches it with room for the maps' growth steps.
func TestLoadScalesLinearly(t *testing.T) {
	if testing.Short() {
		t.Skip("writes and parses 13 MB of policy")
	}
	dir := t.TempDir()
	cost := func(n int) (mallocs, bytes uint64) {
		file := filepath.Join(dir, "big.toml")
		if err := os.WriteFile(file, bigListConfig(randomPrefixes(n), ""), 0o600); err != nil {
			t.Fatal(err)
		}
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		cfg, err := Load(file)
		runtime.ReadMemStats(&after)
		if err != nil {
			t.Fatal(err)
		}
		runtime.KeepAlive(cfg)
		return after.Mallocs - before.Mallocs, after.TotalAlloc - before.TotalAlloc
	}
	smallN, smallB := cost(50_000)
	bigN, bigB := cost(500_000)
	rn, rb := float64(bigN)/float64(smallN), float64(bigB)/float64(smallB)
	t.Logf("Load 500,000 / 50,000 prefixes: %.2f× the allocations (%d / %d), %.2f× the bytes", rn, bigN, smallN, rb)
	for _, c := range []struct {
		what  string
		ratio float64
	}{{"allocations", rn}, {"bytes allocated", rb}} {
		if c.ratio < 5 || c.ratio > 20 {
			t.Errorf("Load of 500,000 prefixes costs %.2f× the %s of 50,000, want about 10 (5 to 20): no longer linear", c.ratio, c.what)
		}
	}
}

// A decision costs about the same against a list of 500,000 prefixes as
// against one of 5 (a trie's walk is bounded by the address's bits, not
// the list's length): the ratio of the fastest of many timed batches,
// each size timed in turn so that a busy machine slows both alike. A scan
// would be tens of thousands of times slower; the bound, 4, leaves room
// for the big trie's cache misses.
func TestDecideBigListRatio(t *testing.T) {
	if testing.Short() {
		t.Skip("parses 500,000 prefixes")
	}
	small, big := bigListPolicy(t, 5, "192.0.2.0/24"), bigListPolicy(t, 500_000, "192.0.2.0/24")
	f := &Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort("192.0.2.80:443"), HasUID: true}
	for _, c := range []*Config{small, big} {
		if r := c.Decide(f); r == nil || r.Name != "big" {
			t.Fatalf("decided %v, want rule \"big\"", r)
		}
	}
	const batch, rounds = 2000, 41
	timed := func(c *Config) time.Duration {
		start := time.Now()
		for range batch {
			c.Decide(f)
		}
		return time.Since(start)
	}
	var ts, tb []time.Duration
	for range rounds {
		ts = append(ts, timed(small))
		tb = append(tb, timed(big))
	}
	ratio := float64(slices.Min(tb)) / float64(slices.Min(ts))
	t.Logf("a decision against 500,000 prefixes: %v, against 5: %v (fastest of %d batches of %d): %.2f×",
		slices.Min(tb)/batch, slices.Min(ts)/batch, rounds, batch, ratio)
	if ratio > 4 {
		t.Errorf("a decision against 500,000 prefixes costs %.2f× one against 5, want at most 4: the list is no longer a trie", ratio)
	}
}
