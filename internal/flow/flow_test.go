package flow

import (
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/ipproto"
)

func key(src, dst string) Key {
	return Key{Proto: ipproto.TCP, Src: netip.MustParseAddrPort(src), Dst: netip.MustParseAddrPort(dst)}
}

func TestIndexes(t *testing.T) {
	tb := newTable()
	f := &Flow{Key: key("198.51.100.2:1000", "192.0.2.80:80"), NewSrc: netip.MustParseAddrPort("203.0.113.2:1000"), Cookie: 1, Start: time.Now()}
	tb.reserve(f)
	if tb.Get(f.Key) != f || !tb.OnWire(key("203.0.113.2:1000", "192.0.2.80:80")) || tb.OnWire(f.Key) {
		t.Fatal("indexes disagree with the inserted flow")
	}
	tb.remove(f)
	if tb.Len() != 0 || tb.OnWire(f.Wire()) {
		t.Fatal("Remove left state behind")
	}
}

func TestSweep(t *testing.T) {
	tb := newTable()
	t0 := time.Now()
	alive := &Flow{Key: key("198.51.100.2:1", "192.0.2.80:80"), NewSrc: netip.MustParseAddrPort("203.0.113.2:1"), Cookie: 10, Start: t0}
	gone := &Flow{Key: key("198.51.100.2:2", "192.0.2.80:80"), NewSrc: netip.MustParseAddrPort("203.0.113.2:2"), Cookie: 20, Start: t0}
	reused := &Flow{Key: key("198.51.100.2:3", "192.0.2.80:80"), NewSrc: netip.MustParseAddrPort("203.0.113.2:3"), Cookie: 30, Start: t0}
	for _, f := range []*Flow{alive, gone, reused} {
		tb.reserve(f)
	}
	s := tb.BeginSweep(t0.Add(time.Second))
	// Created after the dump began: must survive even though not seen.
	young := &Flow{Key: key("198.51.100.2:4", "192.0.2.80:80"), NewSrc: netip.MustParseAddrPort("203.0.113.2:4"), Cookie: 40, Start: t0.Add(2 * time.Second)}
	tb.reserve(young)
	s.Seen(alive.Key, 10)
	s.Seen(reused.Key, 31) // same tuple, another socket: the translated one is gone
	missing := s.End()
	if len(missing) != 2 || tb.Len() != 4 {
		t.Fatalf("missing = %v, table %d (End must not remove)", missing, tb.Len())
	}
	for _, f := range missing {
		if f != gone && f != reused {
			t.Fatalf("%v is not missing", f.Key)
		}
	}
}

func TestConcurrent(t *testing.T) {
	tb := newTable()
	var wg sync.WaitGroup
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 500; i++ {
				f := &Flow{Key: Key{Proto: ipproto.TCP, Src: netip.AddrPortFrom(netip.MustParseAddr("198.51.100.2"), uint16(g*1000+i)),
					Dst: netip.MustParseAddrPort("192.0.2.80:80")}, Start: time.Now()}
				tb.reserve(f)
				_ = tb.Snapshot()
				s := tb.BeginSweep(time.Now())
				s.Seen(f.Key, 0)
				s.End()
			}
		}(g)
	}
	wg.Wait()
}

func TestByCookie(t *testing.T) {
	tb := newTable()
	udp := func(dst string, cookie uint64) *Flow {
		k := key("198.51.100.2:5000", dst)
		k.Proto = ipproto.UDP
		return &Flow{Key: k, NewSrc: netip.MustParseAddrPort("203.0.113.2:5000"), Cookie: cookie}
	}
	a, b, c := udp("192.0.2.80:53", 7), udp("192.0.2.81:53", 7), udp("192.0.2.82:53", 8)
	tcp := &Flow{Key: key("198.51.100.2:6000", "192.0.2.80:80"), NewSrc: netip.MustParseAddrPort("203.0.113.2:6000"), Cookie: 7}
	for _, f := range []*Flow{a, b, c, tcp} {
		if !tb.reserve(f) {
			t.Fatalf("reserve %v", f.Key)
		}
	}
	if got := tb.ByCookie(7); len(got) != 2 {
		t.Fatalf("cookie 7: %d flows, want the 2 UDP ones", len(got))
	}
	tb.remove(a)
	if got := tb.ByCookie(7); len(got) != 1 || got[0] != b {
		t.Fatalf("cookie 7 after removing one: %v", got)
	}
	tb.remove(b)
	tb.remove(c)
	if len(tb.byCookie) != 0 {
		t.Fatalf("index left behind: %v", tb.byCookie)
	}
}
