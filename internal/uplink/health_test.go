package uplink

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/testenv"
	"go.uber.org/goleak"
)

// down_after = 3, up_after = 2: the family goes down on the third failed
// round in a row, not before, and back up on the second good round in a
// row; a good round resets the failures, a failed one the good rounds.
func TestHysteresis(t *testing.T) {
	f := hysteresis{up: true}
	for i, step := range []struct {
		failure string
		up      bool
		why     string
	}{
		{"", true, ""},
		{"x: no answer", true, ""},
		{"x: no answer", true, ""},
		{"", true, ""}, // resets the failures
		{"x: no answer", true, ""},
		{"x: no answer", true, ""},
		{"y: no answer", false, "3 rounds without an answer (y: no answer)"},
		{"y: no answer", false, "4 rounds without an answer (y: no answer)"},
		{"", false, "1 good rounds of 2 needed (last failure: y: no answer)"},
		{"z: refused", false, "1 rounds without an answer (z: refused)"}, // resets the good rounds
		{"", false, "1 good rounds of 2 needed (last failure: z: refused)"},
		{"", true, ""},
		{"", true, ""},
	} {
		up, why, _ := f.observe(step.failure, 3, 2)
		if up != step.up || why != step.why {
			t.Fatalf("round %d (%q): up=%v why=%q, want up=%v why=%q", i+1, step.failure, up, why, step.up, step.why)
		}
	}
}

// Loss is the share of the last 10 rounds that failed.
func TestHysteresisLoss(t *testing.T) {
	f := hysteresis{up: true}
	for i, want := range []float64{1, 0.5, 1.0 / 3, 0.25} {
		failure := ""
		if i == 0 {
			failure = "x"
		}
		if _, _, loss := f.observe(failure, 3, 2); loss != want {
			t.Fatalf("round %d: loss %v, want %v", i+1, loss, want)
		}
	}
	for range 6 { // 10 rounds: 1 failed
		f.observe("", 3, 2)
	}
	if _, _, loss := f.observe("", 3, 2); loss != 0 {
		t.Fatalf("the failed round is 11 rounds old: loss %v, want 0", loss)
	}
}

// setAddrs gives u's IPv4 state the addresses (none: the probes have no
// source, and fail without sending anything).
func setAddrs(s *States, u *policy.Uplink, addrs ...netip.Addr) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.base[u.Mark][0].Addrs = addrs
	s.publish(time.Now())
}

// RunProbes takes an uplink down after down_after failed rounds and up
// after up_after good ones, reports each transition once, and leaves no
// goroutine behind when its context ends. Without an address no probe is
// sent; coming back up connects to a closed port on 127.0.0.1 (a refusal
// is an answer), which needs root for the probe's SO_MARK.
func TestRunProbes(t *testing.T) {
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	u := &policy.Uplink{Name: "isp-b", Mark: 100, Health: &policy.Health{
		Targets:  []policy.Target{{TCP: true, Addr: closedPort(t)}},
		Interval: 20 * time.Millisecond, Timeout: time.Second, DownAfter: 2, UpAfter: 2,
	}}
	s := newStates(u)
	setAddrs(s, u)
	reports := make(chan []Transition, 16)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		RunProbes(ctx, u, s, func(ts []Transition) { reports <- ts })
	}()
	defer func() {
		cancel()
		<-done
	}()

	ts := next(t, reports)
	if len(ts) != 1 || ts[0].Up || ts[0].Family != "ipv4" || !strings.Contains(ts[0].Why, "2 rounds without an answer (no address to send from)") {
		t.Fatalf("transitions %+v, want isp-b ipv4 down after 2 rounds", ts)
	}
	if s.Up(u.Mark, false) || !s.Up(u.Mark, true) {
		t.Fatalf("up: ipv4 %v ipv6 %v, want ipv4 down only (no IPv6 targets)", s.Up(u.Mark, false), s.Up(u.Mark, true))
	}
	st, _ := s.Get(u.Mark, false)
	if !st.Probed || st.Loss != 1 {
		t.Errorf("state %+v: want probed, loss 1", st)
	}
	testenv.NeedRoot(t, "a probe's socket carries the uplink's mark")
	setAddrs(s, u, netip.MustParseAddr("127.0.0.1"))
	ts = next(t, reports)
	if len(ts) != 1 || !ts[0].Up || ts[0].Why != "" {
		t.Fatalf("transitions %+v, want isp-b ipv4 up again", ts)
	}
	if !s.Up(u.Mark, false) {
		t.Fatal("up again, but States says down")
	}
	select {
	case ts := <-reports:
		t.Fatalf("more transitions while nothing changed: %+v", ts)
	case <-time.After(10 * u.Health.Interval):
	}
}

func next(t *testing.T, reports chan []Transition) []Transition {
	t.Helper()
	select {
	case ts := <-reports:
		return ts
	case <-time.After(10 * time.Second):
		t.Fatal("no transition in 10 s")
		return nil
	}
}

// closedPort is a TCP port on 127.0.0.1 nothing listens on.
func closedPort(t *testing.T) netip.AddrPort {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return ap
}
