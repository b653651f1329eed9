package prefixset

import (
	"fmt"
	"net/netip"
	"testing"
)

// Overlapping, nested and adjacent prefixes become disjoint ranges that
// cover exactly the same addresses.
func TestKernelAddrsMerge(t *testing.T) {
	s := &Set{}
	for _, p := range []string{"10.0.0.0/24", "10.0.0.128/25", "10.0.1.0/24", "10.0.3.0/24", "255.255.255.255/32", "255.255.255.0/24"} {
		s.Add(netip.MustParsePrefix(p))
	}
	got := fmt.Sprint(s.KernelAddrs().Ranges[0])
	if want := "[{10.0.0.0 10.0.1.255} {10.0.3.0 10.0.3.255} {255.255.255.0 255.255.255.255}]"; got != want {
		t.Errorf("ranges %s, want %s", got, want)
	}
}
