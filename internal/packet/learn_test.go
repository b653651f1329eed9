package packet

import (
	"net/netip"
	"testing"

	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/sockdiag/sockdiagtest"
)

const learnConf = "[[uplink]]\nname = \"isp-b\"\nmark = 100\n" // (the learner needs no rule)

var hostA, hostB = ispA, ispB

// A flow the kernel decided enters the table as it is in the kernel (no
// change sent), with its socket's cookie; its record again changes nothing.
func TestLearnerEntersKernelFlow(t *testing.T) {
	wd := newWorld(t, learnConf)
	l := NewLearner(wd.s, wd.socks, fakeOwners{})
	src := netip.AddrPortFrom(hostA, 40000)
	wd.socket(ipproto.TCP, src, server, 77)
	l.Decided(syn(t, src, server, 1460), 100, 0, hostB)
	l.Decided(syn(t, src, server, 1460), 100, 0, hostB)
	f := wd.s.Install.Table().Get(flow.Key{Proto: ipproto.TCP, Src: src, Dst: server})
	switch {
	case f == nil:
		t.Fatal("the kernel's flow was not entered")
	case !f.Kernel || f.Cookie != 77 || f.NewSrc != netip.AddrPortFrom(hostB, 40000) || f.Mark != 100:
		t.Errorf("entered %+v", f)
	}
	if n := wd.s.Stats.KernelDecided.Load(); n != 1 {
		t.Errorf("kernel decisions counted: %d, want 1", n)
	}
	wd.s.Install.Flush()
	if len(wd.r.events) != 0 {
		t.Errorf("the kernel was sent %+v for a flow it decided itself", wd.r.events)
	}
}

// A flow whose socket is gone when the learner looks (a UDP socket that
// closed at once, or whose end was announced meanwhile) leaves the table
// and the kernel at once; a SYN of a user with a raw socket ends by
// idleness.
func TestLearnerGoneAndRaw(t *testing.T) {
	wd := newWorld(t, learnConf)
	l := NewLearner(wd.s, wd.socks, fakeOwners{})
	dns := netip.AddrPortFrom(server.Addr(), 53)
	gone := netip.AddrPortFrom(hostA, 40001)
	l.Decided(udp(t, gone, dns, "q"), 100, 1000, hostB)
	closed := netip.AddrPortFrom(hostA, 40002)
	wd.socket(ipproto.UDP, closed, dns, 88)
	wd.s.Closed.Add(88)
	l.Decided(udp(t, closed, dns, "q"), 100, 1000, hostB)
	for _, src := range []netip.AddrPort{gone, closed} {
		if f := wd.s.Install.Table().Get(flow.Key{Proto: ipproto.UDP, Src: src, Dst: dns}); f != nil {
			t.Errorf("the flow of a closed socket %v stays: %+v", src, f)
		}
	}
	wd.s.Install.Flush()
	deletes := 0
	for _, e := range wd.r.events {
		for _, c := range e.changes {
			if c.Delete {
				deletes++
			}
		}
	}
	if deletes != 2 {
		t.Errorf("%d removals sent to the kernel, want 2: %+v", deletes, wd.r.events)
	}

	raw := netip.AddrPortFrom(hostA, 40003)
	l.Decided(syn(t, raw, server, 0), 100, 0, hostB)
	f := wd.s.Install.Table().Get(flow.Key{Proto: ipproto.TCP, Src: raw, Dst: server})
	if f == nil || f.Kernel || !f.Idles() || wd.s.Stats.RawSYNs.Load() != 1 {
		t.Errorf("a raw socket's SYN: %+v, raw SYNs %d; want a flow that ends by idleness", f, wd.s.Stats.RawSYNs.Load())
	}
}

// A reply a native socket took moves the kernel's translation to a free
// port: the table's flow has the new wire source, and the kernel is told
// to remove the old elements, then add the new, in that order.
func TestLearnerMovesTakenFlow(t *testing.T) {
	wd := newWorld(t, learnConf)
	l := NewLearner(wd.s, wd.socks, fakeOwners{})
	src := netip.AddrPortFrom(hostA, 41000)
	wd.socket(ipproto.TCP, src, server, 5)
	native := netip.AddrPortFrom(hostB, 41000)
	wd.socket(ipproto.TCP, native, server, 6)
	l.Decided(syn(t, src, server, 1460), 100, 0, hostB)
	// The server's challenge ACK to the native socket: server -> B:41000.
	l.Taken(syn(t, server, native, 0))
	f := wd.s.Install.Table().Get(flow.Key{Proto: ipproto.TCP, Src: src, Dst: server})
	if f == nil || f.NewSrc.Addr() != hostB || f.NewSrc.Port() == 41000 || f.Kernel {
		t.Fatalf("after the move: %+v", f)
	}
	if wd.s.Stats.Moved.Load() != 1 {
		t.Errorf("moved %d, want 1", wd.s.Stats.Moved.Load())
	}
	var got []bool
	for _, e := range wd.r.events {
		for _, c := range e.changes {
			got = append(got, c.Delete)
		}
	}
	if len(got) != 2 || !got[0] || got[1] {
		t.Errorf("kernel changes (delete?) %v, want [true false]", got)
	}
}

// A TCP flow whose socket ended before the learner looked leaves at once
// when its end was announced (its tuple is among the recent ends), so that
// the next socket on its port is the kernel's to decide; so does one whose
// socket's end was announced while the learner looked, unless a TIME_WAIT
// socket owns the tuple now.
func TestLearnerTCPEndAnnounced(t *testing.T) {
	wd := newWorld(t, learnConf)
	l := NewLearner(wd.s, wd.socks, fakeOwners{})
	gone := netip.AddrPortFrom(hostA, 40001)
	wd.s.ClosedTCP.Add(ClosedKey(gone.Port(), server.Addr()))
	l.Decided(syn(t, gone, server, 1460), 100, 0, hostB)
	if f := wd.s.Install.Table().Get(flow.Key{Proto: ipproto.TCP, Src: gone, Dst: server}); f != nil {
		t.Errorf("the flow of a socket whose end was announced stays: %+v", f)
	}
	if n, raw := wd.s.Stats.TCPClosed.Load(), wd.s.Stats.RawSYNs.Load(); n != 1 || raw != 0 {
		t.Errorf("TCP flows ended by announcement %d, raw SYNs %d; want 1 and 0", n, raw)
	}

	// Its end announced while the learner looked: gone, or in TIME_WAIT.
	ending := netip.AddrPortFrom(hostA, 40002)
	wd.socket(ipproto.TCP, ending, server, 90)
	wd.s.Closed.Add(90)
	timeWait := netip.AddrPortFrom(hostA, 40003)
	wd.socket(ipproto.TCP, timeWait, server, 91)
	wd.s.Closed.Add(91)
	lookups := &endingSockets{Sockets: wd.socks, gone: ending}
	l = NewLearner(wd.s, lookups, fakeOwners{})
	l.Decided(syn(t, ending, server, 1460), 100, 0, hostB)
	l.Decided(syn(t, timeWait, server, 1460), 100, 0, hostB)
	if f := wd.s.Install.Table().Get(flow.Key{Proto: ipproto.TCP, Src: ending, Dst: server}); f != nil {
		t.Errorf("the flow of a socket that ended while the learner looked stays: %+v", f)
	}
	if f := wd.s.Install.Table().Get(flow.Key{Proto: ipproto.TCP, Src: timeWait, Dst: server}); f == nil {
		t.Error("the flow of a socket whose tuple a TIME_WAIT socket owns was ended")
	}
}

// endingSockets finds the socket on gone once, then no more: it ended
// between the learner's two lookups.
type endingSockets struct {
	*sockdiagtest.Sockets
	gone netip.AddrPort
	seen bool
}

func (e *endingSockets) Lookup(p ipproto.Proto, local, remote netip.AddrPort) (sockdiag.Socket, error) {
	if local == e.gone {
		if e.seen {
			return sockdiag.Socket{}, sockdiag.ErrNotFound
		}
		e.seen = true
	}
	return e.Sockets.Lookup(p, local, remote)
}

// Closed keeps the last closedKept ends; a key added twice stays until
// its last addition leaves the ring.
func TestClosedRing(t *testing.T) {
	var c Closed[uint64]
	c.Add(1)
	c.Add(1)
	for i := uint64(0); i < closedKept-1; i++ {
		c.Add(1000 + i)
	}
	if !c.Has(1) {
		t.Fatal("a key added twice left with its first addition")
	}
	c.Add(5)
	if c.Has(1) || !c.Has(5) || !c.Has(1000) {
		t.Fatalf("after the ring came round: has 1 %v, 5 %v, 1000 %v", c.Has(1), c.Has(5), c.Has(1000))
	}
	if len(c.set) != closedKept {
		t.Fatalf("%d keys kept, want %d", len(c.set), closedKept)
	}
}
