package uplink

import (
	"net/netip"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/policy"
)

var (
	ispA = &policy.Uplink{Name: "isp-a", Mark: 200}
	ispB = &policy.Uplink{Name: "isp-b", Mark: 100}
	dst  = netip.MustParseAddr("192.0.2.80")
)

// newStates are the states of ups, every one up in both families with
// an address of each, as Update would publish them (without a kernel).
func newStates(ups ...*policy.Uplink) *States {
	s := &States{}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.uplinks, s.base = ups, map[uint32]*[2]Status{}
	for _, u := range ups {
		s.base[u.Mark] = &[2]Status{
			{Uplink: u.Name, Family: "ipv4", Up: true, Addrs: []netip.Addr{netip.MustParseAddr("127.0.0.1")}},
			{Uplink: u.Name, Family: "ipv6", Up: true, Addrs: []netip.Addr{netip.MustParseAddr("::1")}},
		}
	}
	s.publish(time.Now())
	return s
}

// setUp sets what u's probes say in one family (only a probe that fails
// changes an uplink the kernel calls up).
func setUp(s *States, u *policy.Uplink, v6, up bool) {
	s.SetProbe(u.Mark, v6, up, "test says so", 0, 0, time.Now())
}

func balance(sticky bool, stickyFor time.Duration, choices ...any) *policy.Rule {
	r := &policy.Rule{Name: "bulk"}
	r.Action.Kind = policy.ActBalance
	r.Action.Sticky, r.Action.StickyFor = sticky, stickyFor
	for i := 0; i < len(choices); i += 2 {
		u, _ := choices[i].(*policy.Uplink)
		name := "default"
		if u != nil {
			name = u.Name
		}
		r.Action.Choices = append(r.Action.Choices, policy.Choice{Name: name, Uplink: u})
		r.Action.Weights = append(r.Action.Weights, choices[i+1].(int))
	}
	return r
}

// picks counts the marks n picks give, per mark; a pick that reports no
// uplink counts under "none".
func picks(t *testing.T, b *Balancer, s *States, r *policy.Rule, n int, uid func(int) uint32, dst func(int) netip.Addr, v6 bool) map[string]int {
	t.Helper()
	got := map[string]int{}
	for i := range n {
		mark, ok := b.Pick(s, r, uid(i), dst(i), v6)
		switch {
		case !ok:
			got["none"]++
		case mark == ispA.Mark:
			got["isp-a"]++
		case mark == ispB.Mark:
			got["isp-b"]++
		case mark == 0:
			got["default"]++
		default:
			t.Fatalf("picked mark %d, no choice's", mark)
		}
	}
	return got
}

func one[T any](v T) func(int) T { return func(int) T { return v } }

// Each new flow picks an up uplink by weight: 3:1 gives isp-a about three
// flows in four (8000 picks: the share's standard deviation is 0.005).
func TestBalanceByWeight(t *testing.T) {
	s, b := newStates(ispA, ispB), &Balancer{}
	got := picks(t, b, s, balance(false, 0, ispA, 3, ispB, 1), 8000, one[uint32](1000), one(dst), false)
	if share := float64(got["isp-a"]) / 8000; share < 0.72 || share > 0.78 || got["isp-a"]+got["isp-b"] != 8000 {
		t.Fatalf("picks %v: isp-a's share %.3f, want 0.75", got, share)
	}
	if len(b.m) != 0 {
		t.Fatalf("a rule without sticky left %d sticky choices", len(b.m))
	}
}

// An uplink that is down is never picked, per family; none up is no pick,
// and "default" (the host's routing) is always up.
func TestBalanceSkipsDown(t *testing.T) {
	s, b := newStates(ispA, ispB), &Balancer{}
	r := balance(false, 0, ispA, 1, ispB, 1)
	setUp(s, ispB, false, false)
	if got := picks(t, b, s, r, 200, one[uint32](1000), one(dst), false); got["isp-a"] != 200 {
		t.Errorf("isp-b down in IPv4: picks %v, want isp-a only", got)
	}
	if got := picks(t, b, s, r, 200, one[uint32](1000), one(dst), true); got["isp-a"] == 0 || got["isp-b"] == 0 {
		t.Errorf("isp-b up in IPv6: picks %v, want both", got)
	}
	setUp(s, ispA, false, false)
	if got := picks(t, b, s, r, 10, one[uint32](1000), one(dst), false); got["none"] != 10 {
		t.Errorf("both down: picks %v, want none", got)
	}
	withDefault := balance(false, 0, ispA, 1, ispB, 1, nil, 1)
	if got := picks(t, b, s, withDefault, 10, one[uint32](1000), one(dst), false); got["default"] != 10 {
		t.Errorf("both down, default listed: picks %v, want default", got)
	}
	setUp(s, ispB, false, true)
	if got := picks(t, b, s, r, 200, one[uint32](1000), one(dst), false); got["isp-b"] != 200 {
		t.Errorf("isp-b back: picks %v, want isp-b only", got)
	}
}

// Sticky: a user's flows to one destination keep one uplink; other users
// and destinations pick afresh; a sticky uplink that goes down gives way,
// and the new choice sticks.
func TestBalanceSticky(t *testing.T) {
	s, b := newStates(ispA, ispB), &Balancer{}
	r := balance(true, 10*time.Minute, ispA, 1, ispB, 1)
	first, _ := b.Pick(s, r, 1000, dst, false)
	if got := picks(t, b, s, r, 200, one[uint32](1000), one(dst), false); got[name(first)] != 200 {
		t.Fatalf("first pick %s, then %v: want every one the same", name(first), got)
	}
	// 64 destinations, 64 users: each key picks at random.
	dsts := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{192, 0, 2, byte(i)}) }
	if got := picks(t, b, s, r, 64, one[uint32](1000), dsts, false); got["isp-a"] == 0 || got["isp-b"] == 0 {
		t.Errorf("64 destinations: picks %v, want both uplinks", got)
	}
	if got := picks(t, b, s, r, 64, func(i int) uint32 { return uint32(2000 + i) }, one(dst), false); got["isp-a"] == 0 || got["isp-b"] == 0 {
		t.Errorf("64 users: picks %v, want both uplinks", got)
	}
	if n := len(b.m); n != 1+64+64 { // one per user and destination
		t.Errorf("%d sticky choices, want 129", n)
	}

	other := ispA
	if first == ispA.Mark {
		other = ispB
	}
	setUp(s, byMark(first), false, false)
	if m, ok := b.Pick(s, r, 1000, dst, false); !ok || m != other.Mark {
		t.Fatalf("sticky uplink %s down: picked %s, want %s", name(first), name(m), other.Name)
	}
	setUp(s, byMark(first), false, true)
	if got := picks(t, b, s, r, 100, one[uint32](1000), one(dst), false); got[other.Name] != 100 {
		t.Fatalf("after %s came back: picks %v, want %s (the new choice) every time", name(first), got, other.Name)
	}
}

// A sticky choice lasts sticky_for after the last flow: Pick ignores an
// older one, Expire forgets it.
func TestBalanceStickyExpires(t *testing.T) {
	s, b := newStates(ispA, ispB), &Balancer{}
	brief := balance(true, time.Nanosecond, ispA, 1, ispB, 1)
	if got := picks(t, b, s, brief, 200, one[uint32](1000), one(dst), false); got["isp-a"] == 0 || got["isp-b"] == 0 {
		t.Errorf("sticky_for 1ns: picks %v, want both uplinks", got)
	}
	b.Expire(time.Now())
	if len(b.m) != 0 {
		t.Errorf("Expire left %d choices older than sticky_for", len(b.m))
	}
	long := balance(true, 10*time.Minute, ispA, 1, ispB, 1)
	b.Pick(s, long, 1000, dst, false)
	b.Expire(time.Now().Add(9 * time.Minute))
	if len(b.m) != 1 {
		t.Fatalf("Expire 9 minutes on: %d choices, want 1", len(b.m))
	}
	b.Expire(time.Now().Add(10*time.Minute + time.Second))
	if len(b.m) != 0 {
		t.Fatalf("Expire past sticky_for: %d choices, want 0", len(b.m))
	}
}

func name(mark uint32) string {
	return map[uint32]string{0: "default", 100: "isp-b", 200: "isp-a"}[mark]
}

func byMark(mark uint32) *policy.Uplink { return map[uint32]*policy.Uplink{100: ispB, 200: ispA}[mark] }
