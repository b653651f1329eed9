package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// linearMatch is how dst matched before the trie: every prefix in turn,
// against the unmapped address.
func linearMatch(ps []netip.Prefix, dst netip.Addr) bool {
	a := dst.Unmap()
	for _, p := range ps {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// nearby returns a random address close to base: the same leading bits,
// then random ones, so that addresses land in, next to and outside prefixes.
func nearby(rng *rand.Rand, base netip.Addr) netip.Addr {
	b := base.AsSlice()
	keep := rng.IntN(len(b)*8 + 1)
	for i := range b {
		for bit := 0; bit < 8; bit++ {
			if i*8+bit >= keep && rng.IntN(2) == 1 {
				b[i] ^= 0x80 >> bit
			}
		}
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// randomMixedPrefixes draws n prefixes of any length, IPv4, IPv6 and
// IPv4-mapped IPv6, around a few bases so that they nest and overlap.
func randomMixedPrefixes(rng *rand.Rand, bases []netip.Addr, n int) []netip.Prefix {
	ps := make([]netip.Prefix, n)
	for i := range ps {
		a := nearby(rng, bases[rng.IntN(len(bases))])
		// Mostly long ones, like real lists; a few of any length, /0 too.
		bits := a.BitLen() - rng.IntN(a.BitLen()/4+1)
		if rng.IntN(500) == 0 {
			bits = rng.IntN(a.BitLen() + 1)
		}
		ps[i] = netip.PrefixFrom(a, bits).Masked()
	}
	return ps
}

var trieBases = []netip.Addr{
	netip.MustParseAddr("10.1.2.3"),
	netip.MustParseAddr("192.0.2.77"),
	netip.MustParseAddr("2001:db8::1"),
	netip.MustParseAddr("2001:db8:ffff::abcd"),
	netip.MustParseAddr("::ffff:10.1.2.3"), // mapped: stays IPv6 in the list
}

// The trie matches exactly what the linear scan matched, for dst and
// not_dst, over thousands of random prefixes and addresses.
func TestTrieAgreesWithLinearMatch(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	for _, n := range []int{0, 1, 9, 3000} {
		ps := randomMixedPrefixes(rng, trieBases, n)
		written := make([]string, len(ps))
		for i, p := range ps {
			written[i] = fmt.Sprintf("%q", p.String())
			if p.IsSingleIP() && rng.IntN(2) == 0 {
				written[i] = fmt.Sprintf("%q", p.Addr().String()) // a bare address is a /32 or /128
			}
		}
		list := "[" + strings.Join(written, ", ") + "]"
		src := fmt.Sprintf("[[uplink]]\nname = \"b\"\nmark = 1\n[[rule]]\nuplink = \"b\"\ndst = %s\n[[rule]]\nuplink = \"b\"\nnot_dst = %s\n", list, list)
		cfg, err := Parse("trie.toml", []byte(src))
		if err != nil {
			t.Fatal(err)
		}
		dst, notDst := cfg.Rules[0], cfg.Rules[1]
		hits := 0
		for i := 0; i < 5000; i++ {
			a := nearby(rng, trieBases[rng.IntN(len(trieBases))])
			switch rng.IntN(10) {
			case 0:
				a = netip.AddrFrom16(a.As16()) // IPv4 as mapped: unmapped before the match
			case 1:
				if a.Is6() {
					a = a.WithZone("eth0") // never matched a prefix
				}
			}
			f := &Flow{Proto: ipproto.TCP, Dst: netip.AddrPortFrom(a, 443)}
			want := linearMatch(ps, a)
			if want {
				hits++
			}
			if got := dst.Match(f); got != want {
				t.Fatalf("%d prefixes: dst matches %v: %v, linear scan %v", n, a, got, want)
			}
			if got := notDst.Match(f); got != !want {
				t.Fatalf("%d prefixes: not_dst matches %v: %v, linear scan %v", n, a, got, !want)
			}
		}
		// Both answers must be common, or the comparison proves little.
		if n == 3000 && (hits < 1000 || hits > 4000) {
			t.Errorf("%d prefixes: %d of 5000 addresses matched; the test data needs rebalancing", n, hits)
		}
		t.Logf("%d prefixes: %d of 5000 addresses matched", n, hits)
	}
}

func TestTrieExplain(t *testing.T) {
	policy := func(key string, n int, extra string) *Rule {
		t.Helper()
		var b strings.Builder
		for i := 0; i < n; i++ {
			fmt.Fprintf(&b, "\"10.0.%d.0/24\", ", i)
		}
		b.WriteString(extra)
		cfg, err := Parse("x.toml", []byte(fmt.Sprintf("[[rule]]\nuplink = \"default\"\n%s = [%s]\n", key, b.String())))
		if err != nil {
			t.Fatal(err)
		}
		return cfg.Rules[0]
	}
	flow := func(dst string) *Flow { return &Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort(dst)} }
	for _, c := range []struct {
		rule *Rule
		dst  string
		want string
	}{
		// Short lists read as before, whole.
		{policy("dst", 0, `"2001:db8::/32", "198.51.100.7"`), "192.0.2.80:443",
			"dst: 192.0.2.80 is not in [2001:db8::/32, 198.51.100.7/32]"},
		{policy("dst", 8, ""), "192.0.2.80:443",
			"dst: 192.0.2.80 is not in [10.0.0.0/24, 10.0.1.0/24, 10.0.2.0/24, 10.0.3.0/24, 10.0.4.0/24, 10.0.5.0/24, 10.0.6.0/24, 10.0.7.0/24]"},
		{policy("not_dst", 2, ""), "10.0.1.9:443", "not_dst: 10.0.1.9 is in [10.0.0.0/24, 10.0.1.0/24]"},
		// Long ones: the first entries, or the entry that holds the address.
		{policy("dst", 9, ""), "192.0.2.80:443",
			"dst: 192.0.2.80 is not in [10.0.0.0/24, 10.0.1.0/24, 10.0.2.0/24, 10.0.3.0/24, 10.0.4.0/24, 10.0.5.0/24, 10.0.6.0/24, 10.0.7.0/24, … and 1 more]"},
		{policy("not_dst", 200, `"10.0.0.0/8", "10.0.150.7"`), "10.0.150.7:443",
			"not_dst: 10.0.150.7 is in 10.0.150.7/32 (one of 202 entries)"},
		{policy("not_dst", 200, `"10.0.0.0/8"`), "[::ffff:10.0.250.1]:443",
			"not_dst: ::ffff:10.0.250.1 is in 10.0.0.0/8 (one of 201 entries)"},
	} {
		if got := c.rule.Explain(flow(c.dst)); got != c.want {
			t.Errorf("Explain(%s) =\n  %q\nwant\n  %q", c.dst, got, c.want)
		}
	}
}

// A decision against a dst list allocates nothing, whatever its size.
func TestTrieMatchDoesNotAllocate(t *testing.T) {
	for _, n := range []int{5, 50_000} {
		cfg := bigListPolicy(t, n, "192.0.2.0/24")
		f := &Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort("192.0.2.80:443")}
		if allocs := testing.AllocsPerRun(100, func() { cfg.Decide(f) }); allocs != 0 {
			t.Errorf("%d prefixes: %v allocations per decision", n, allocs)
		}
	}
}
