package packet

import (
	"net/netip"
	"testing"

	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/ipproto"
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
// and the kernel at once; a SYN no TCP socket owns (a short connection
// over, a raw socket's) is followed by its tuple, for the sweep to end.
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
	if f == nil || !f.Kernel || f.Cookie != 0 || f.Idles() {
		t.Errorf("a SYN no socket owns: %+v; want a kernel flow followed by its tuple", f)
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

// A SYN the kernel translated with its tuple's elements: a
// retransmission changes nothing; a new socket with the same mark takes
// the flow over, with no kernel change; one with another mark ends the
// translation (its SYN, sent again, is decided afresh); one whose socket
// or flow is gone is counted.
func TestLearnerReused(t *testing.T) {
	wd := newWorld(t, learnConf)
	l := NewLearner(wd.s, wd.socks, fakeOwners{})
	src := netip.AddrPortFrom(hostA, 40000)
	key := flow.Key{Proto: ipproto.TCP, Src: src, Dst: server}
	wd.socket(ipproto.TCP, src, server, 77)
	l.Decided(syn(t, src, server, 1460), 100, 0, hostB)
	old := wd.s.Install.Table().Get(key)

	l.Reused(syn(t, src, server, 1460), 100)
	if f := wd.s.Install.Table().Get(key); f != old || wd.s.Stats.Reuses[ReuseRetransmission].Load() != 1 {
		t.Fatalf("a retransmission: flow %+v, reuses %d", f, wd.s.Stats.Reuses[ReuseRetransmission].Load())
	}

	wd.socket(ipproto.TCP, src, server, 78) // the old socket ended, a new one has the tuple
	l.Reused(syn(t, src, server, 1460), 100)
	f := wd.s.Install.Table().Get(key)
	switch {
	case f == nil || f == old:
		t.Fatalf("a new socket did not take the flow over: %+v", f)
	case f.Cookie != 78 || f.NewSrc != old.NewSrc || f.Mark != 100 || !f.Kernel || f.Seq != old.Seq:
		t.Errorf("the new socket's flow: %+v, the old: %+v", f, old)
	case wd.s.Install.Table().ByWire(f.Wire()) != f:
		t.Error("the wire index still names the old flow")
	}
	if n := wd.s.Stats.Reuses[ReuseNewSocket].Load(); n != 1 {
		t.Errorf("new sockets counted: %d, want 1", n)
	}
	wd.s.Install.Flush()
	if len(wd.r.events) != 0 {
		t.Errorf("the kernel was sent %+v for a flow its elements serve as they are", wd.r.events)
	}

	wd.socket(ipproto.TCP, src, server, 79) // a new socket, marked for another uplink
	l.Reused(syn(t, src, server, 1460), 200)
	if f := wd.s.Install.Table().Get(key); f != nil || wd.s.Stats.Reuses[ReuseOtherMark].Load() != 1 {
		t.Fatalf("a new socket with another mark: flow %+v, counted %d", f, wd.s.Stats.Reuses[ReuseOtherMark].Load())
	}
	wd.s.Install.Flush()
	if len(wd.r.events) != 1 || !wd.r.events[0].changes[0].Delete {
		t.Errorf("kernel changes %+v, want the translation's removal", wd.r.events)
	}

	l.Reused(syn(t, src, server, 1460), 100) // its flow is gone
	if n := wd.s.Stats.Reuses[ReuseGone].Load(); n != 1 {
		t.Errorf("reuses of a gone flow counted: %d, want 1", n)
	}
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
