package ipproto

import (
	"strconv"
	"testing"
)

// The names are what logs, the debug stream, metric labels and `rerouted
// flows` have always shown: they must not change.
func TestString(t *testing.T) {
	named := map[Proto]string{1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
	for i := 0; i < 256; i++ {
		p := Proto(i)
		want, ok := named[p]
		if !ok {
			want = strconv.Itoa(i)
		}
		if got := p.String(); got != want {
			t.Errorf("Proto(%d).String() = %q, want %q", i, got, want)
		}
	}
	if ICMP != 1 || TCP != 6 || UDP != 17 || ICMPv6 != 58 {
		t.Error("the constants are not the IANA numbers")
	}
}

func TestStringDoesNotAllocate(t *testing.T) {
	var s string
	if n := testing.AllocsPerRun(100, func() {
		for _, p := range []Proto{TCP, UDP, ICMP, ICMPv6} {
			s = p.String()
		}
	}); n != 0 {
		t.Errorf("String allocates %v times", n)
	}
	_ = s
}
