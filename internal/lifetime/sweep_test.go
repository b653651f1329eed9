package lifetime

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/nftdp"
	"github.com/rerouted/rerouted/internal/packet"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/route"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/sockdiag/sockdiagtest"
	"github.com/rerouted/rerouted/internal/testenv"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
)

// The sweeper, adoption and the socket-end watchers, run against fakes of sock_diag and the
// datapath: no root, no kernel. What they check is which flows leave the
// table, and which removals reach the kernel.

type tuple = sockdiagtest.Tuple

// fakeMaps is the datapath's flow maps.
type fakeMaps struct {
	entries []nftdp.Entry
	deleted []nftdp.Entry
	uses    []nftdp.Use
	over    map[uint32]uint64
}

func (m *fakeMaps) Entries() ([]nftdp.Entry, error) { return m.entries, nil }
func (m *fakeMaps) Delete(es ...nftdp.Entry) error  { m.deleted = append(m.deleted, es...); return nil }
func (m *fakeMaps) Uses() ([]nftdp.Use, error)      { return m.uses, nil }
func (m *fakeMaps) OverBudget() (map[uint32]uint64, error) {
	return m.over, nil
}

type noRoutes struct{}

func (noRoutes) Lookup(netip.Addr, uint32, uint32, bool) (route.Route, error) {
	return route.Route{Dev: "isp-b"}, nil
}
func (noRoutes) Link(int) (route.Link, error) { return route.Link{}, nil }

// recordingKernel records the flow changes the installer applies.
type recordingKernel struct{ changes []flow.Change }

func (k *recordingKernel) Apply(cs []flow.Change) error {
	k.changes = append(k.changes, cs...)
	return nil
}

// fixture is an Env with an installer into a recordingKernel, and the
// counters and configuration it points to.
type fixture struct {
	env                                                Env
	k                                                  *recordingKernel
	cfg                                                atomic.Pointer[policy.Config]
	idle, udpClosed, sweepErrors, udpEvents, tcpEvents atomic.Uint64
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	fx := &fixture{k: &recordingKernel{}}
	s := &packet.Shared{Log: slog.New(slog.DiscardHandler), Stats: &packet.Stats{}, Config: &fx.cfg}
	s.Install = flow.NewInstaller(fx.k, func(c flow.Change, err error) { t.Errorf("change of %v refused: %v", c.Flow.Src, err) })
	fx.env = Env{Shared: s, Idle: &fx.idle, UDPClosed: &fx.udpClosed, SweepErrors: &fx.sweepErrors,
		UDPEvents: &fx.udpEvents, TCPEvents: &fx.tcpEvents}
	return fx
}

var (
	peer = netip.MustParseAddrPort("203.0.113.80:443")
	ispB = netip.MustParseAddr("198.51.100.2")
)

func sock(port uint16) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port)
}

// addFlow installs a translated flow of a socket that existed a minute ago.
func (fx *fixture) addFlow(t *testing.T, proto ipproto.Proto, src netip.AddrPort, cookie uint64) *flow.Flow {
	t.Helper()
	f := &flow.Flow{Key: flow.Key{Proto: proto, Src: src, Dst: peer}, Mark: 200, Cookie: cookie, Start: time.Now().Add(-time.Minute)}
	f.UsedAt = f.Start
	if !fx.env.Shared.Install.Add(f, netip.AddrPortFrom(ispB, src.Port())) {
		t.Fatalf("flow %v not added", src)
	}
	fx.env.Shared.Install.Flush()
	return f
}

// removed applies the pending changes, as the installer's goroutine
// would, and returns the flows removed from the kernel so far.
func (fx *fixture) removed() []netip.AddrPort {
	fx.env.Shared.Install.Flush()
	var out []netip.AddrPort
	for _, c := range fx.k.changes {
		if c.Delete {
			out = append(out, c.Flow.Src)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Port() < out[j].Port() })
	return out
}

// A flow leaves only when its socket is gone in two sweeps running: a dump
// that misses a live socket removes nothing, and neither does one miss.
func TestSweepRemovesOnlyWhatIsGoneTwice(t *testing.T) {
	fx := newFixture(t)
	socks := &sockdiagtest.Sockets{Socks: map[tuple]sockdiag.Socket{}, Missed: map[tuple]bool{}}
	live := func(proto ipproto.Proto, port uint16, cookie uint64) {
		socks.Socks[tuple{Proto: proto, Local: sock(port), Remote: peer}] = sockdiag.Socket{Local: sock(port), Remote: peer, Cookie: cookie}
	}
	fx.addFlow(t, ipproto.TCP, sock(1001), 1) // alive, in the dump
	fx.addFlow(t, ipproto.TCP, sock(1002), 2) // alive, missed by the dump
	fx.addFlow(t, ipproto.TCP, sock(1003), 3) // gone
	fx.addFlow(t, ipproto.TCP, sock(1004), 4) // its tuple now another socket's
	fx.addFlow(t, ipproto.UDP, sock(1005), 5) // unconnected UDP: the dump shows its cookie on another tuple
	fx.addFlow(t, ipproto.UDP, sock(1006), 6) // UDP, gone
	echo := fx.addFlow(t, ipproto.ICMP, sock(77), 0)
	live(ipproto.TCP, 1001, 1)
	live(ipproto.TCP, 1002, 2)
	socks.Missed[tuple{Proto: ipproto.TCP, Local: sock(1002), Remote: peer}] = true
	live(ipproto.TCP, 1004, 40)
	socks.Socks[tuple{Proto: ipproto.UDP, Local: sock(1005)}] = sockdiag.Socket{Local: sock(1005), Cookie: 5}

	sw := New(fx.env, socks, nil)
	sw.sweep()
	if got := fx.removed(); len(got) != 0 {
		t.Fatalf("the first sweep removed %v: one miss is not enough", got)
	}
	sw.sweep()
	want := []netip.AddrPort{sock(1003), sock(1004), sock(1006)}
	if got := fx.removed(); len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("removed %v, want %v", got, want)
	}
	if fx.env.flows().Len() != 4 || fx.env.flows().Get(echo.Key) == nil {
		t.Fatalf("%d flows left, want 4 (the echo ends by idleness only)", fx.env.flows().Len())
	}
}

// A dump that fails removes nothing: an incomplete dump is not "every
// socket gone". It is counted.
func TestSweepDumpErrorRemovesNothing(t *testing.T) {
	fx := newFixture(t)
	fx.addFlow(t, ipproto.TCP, sock(1001), 1)
	socks := &sockdiagtest.Sockets{Socks: map[tuple]sockdiag.Socket{}, DumpErr: unix.ENOBUFS}
	sw := New(fx.env, socks, nil)
	for range 3 {
		sw.sweep()
	}
	if len(fx.removed()) != 0 || fx.sweepErrors.Load() != 3 {
		t.Fatalf("removed %v, sweep errors %d", fx.removed(), fx.sweepErrors.Load())
	}
}

// UDP and echo flows end when their elements counted no packet for the
// idle timeout; a count that moved keeps them.
func TestExpireIdle(t *testing.T) {
	fx := newFixture(t)
	busy := fx.addFlow(t, ipproto.UDP, sock(1001), 1)
	idle := fx.addFlow(t, ipproto.UDP, sock(1002), 2)
	tcp := fx.addFlow(t, ipproto.TCP, sock(1003), 3)
	maps := &fakeMaps{uses: []nftdp.Use{
		{Proto: ipproto.UDP, Src: busy.Src, Dst: busy.Dst, Packets: 10},
		{Proto: ipproto.UDP, Reply: true, Src: busy.NewSrc, Dst: busy.Dst, Packets: 5},
	}}
	now := time.Now()
	New(fx.env, nil, maps).expireIdle(now, 30*time.Second)
	if busy.Used != 15 || !busy.UsedAt.Equal(now) {
		t.Fatalf("busy flow's count %d at %v", busy.Used, busy.UsedAt)
	}
	if got := fx.removed(); len(got) != 1 || got[0] != idle.Src {
		t.Fatalf("removed %v, want only the idle flow %v", got, idle.Src)
	}
	New(fx.env, nil, maps).expireIdle(now.Add(29*time.Second), 30*time.Second)
	New(fx.env, nil, maps).expireIdle(now.Add(31*time.Second), 30*time.Second)
	if got := fx.removed(); len(got) != 2 || fx.env.flows().Get(tcp.Key) == nil {
		t.Fatalf("removed %v; a TCP flow with a socket must never idle", got)
	}
	if fx.idle.Load() != 2 {
		t.Fatalf("idle counter %d", fx.idle.Load())
	}
}

// Adoption keeps the elements whose socket still lives (and echoes, which
// have none to follow), and removes the rest and duplicates.
func TestAdopt(t *testing.T) {
	fx := newFixture(t)
	socks := &sockdiagtest.Sockets{Socks: map[tuple]sockdiag.Socket{
		{Proto: ipproto.TCP, Local: sock(1001), Remote: peer}: {Cookie: 11, UID: 1000, Inode: 5},
		{Proto: ipproto.UDP, Local: sock(1003), Remote: peer}: {Cookie: 13},
	}}
	tr := func(proto ipproto.Proto, port uint16) nftdp.Entry {
		return nftdp.Entry{Proto: proto, Src: sock(port), Dst: peer, NewSrc: netip.AddrPortFrom(ispB, port), Mark: 200}
	}
	live, gone, udp, ping := tr(ipproto.TCP, 1001), tr(ipproto.TCP, 1002), tr(ipproto.UDP, 1003), tr(ipproto.ICMP, 77)
	dup := live
	dup.NewSrc = netip.AddrPortFrom(ispB, 2001) // a second element for the same socket tuple
	maps := &fakeMaps{entries: []nftdp.Entry{live, gone, udp, ping, dup}}
	if err := New(fx.env, socks, maps).Adopt(noRoutes{}); err != nil {
		t.Fatal(err)
	}
	if len(maps.deleted) != 2 || maps.deleted[0] != gone || maps.deleted[1] != dup {
		t.Fatalf("deleted %+v, want the gone socket's and the duplicate", maps.deleted)
	}
	f := fx.env.flows().Get(flow.Key{Proto: ipproto.TCP, Src: sock(1001), Dst: peer})
	if fx.env.flows().Len() != 3 || f == nil || f.Cookie != 11 || f.UID != 1000 || f.Dev != "isp-b" || f.NewSrc != live.NewSrc {
		t.Fatalf("%d flows; adopted %+v", fx.env.flows().Len(), f)
	}
	if !fx.env.Shared.Install.Installed(f) {
		t.Fatal("an adopted flow's elements are in the kernel already: it must count as installed")
	}
}

// A socket missed once and then seen again is no longer a suspect: a later
// single miss does not remove it.
func TestSweepSuspicionClearsWhenSeen(t *testing.T) {
	fx := newFixture(t)
	fx.addFlow(t, ipproto.TCP, sock(1001), 1)
	gone := &sockdiagtest.Sockets{Socks: map[tuple]sockdiag.Socket{}}
	back := &sockdiagtest.Sockets{Socks: map[tuple]sockdiag.Socket{{Proto: ipproto.TCP, Local: sock(1001), Remote: peer}: {Local: sock(1001), Remote: peer, Cookie: 1}}}
	sw := New(fx.env, gone, nil)
	sweep := func(diag sockdiag.Sockets) { sw.diag = diag; sw.sweep() }
	sweep(gone) // missed: a suspect
	sweep(back) // seen
	sweep(gone) // missed once more: a suspect again, not removed
	if got := fx.removed(); len(got) != 0 {
		t.Fatalf("removed %v after misses that were not in a row", got)
	}
	sweep(gone)
	if got := fx.removed(); len(got) != 1 {
		t.Fatalf("removed %v after two misses in a row, want the flow", got)
	}
}

// A lookup that fails (not "no such socket") removes nothing, and is
// counted.
func TestSweepLookupErrorRemovesNothing(t *testing.T) {
	fx := newFixture(t)
	fx.addFlow(t, ipproto.TCP, sock(1001), 1)
	broken := &sockdiagtest.Sockets{LookupErr: unix.ENOBUFS} // no socket in dumps; every exact lookup fails
	sw := New(fx.env, broken, nil)
	for range 3 {
		sw.sweep()
	}
	if got := fx.removed(); len(got) != 0 || fx.env.Shared.Stats.Errors[packet.ErrSocketLookup].Load() != 3 {
		t.Fatalf("removed %v, lookup errors %d", got, fx.env.Shared.Stats.Errors[packet.ErrSocketLookup].Load())
	}
}

// Each user whose new flows went past the per-user budget is reported at
// WARNING once per rise of its count, with how many more since the last
// report: a flood is said loudly, not once a sweep.
func TestOverBudgetReportedOncePerRise(t *testing.T) {
	fx := newFixture(t)
	var logs logRecorder
	fx.env.Shared.Log = slog.New(&logs)
	cfg, err := policy.Parse("t.toml", []byte("[daemon]\nnew_flows_per_uid = 50\n"))
	if err != nil {
		t.Fatal(err)
	}
	fx.cfg.Store(cfg)
	maps := &fakeMaps{over: map[uint32]uint64{1000: 7}}
	sw := New(fx.env, nil, maps)
	sw.reportOverBudget()
	sw.reportOverBudget() // no change: nothing more
	maps.over[1000], maps.over[1001] = 10, 1
	sw.reportOverBudget()
	got := logs.warnings()
	want := []string{"uid=1000 over_budget=7 total=7", "uid=1000 over_budget=3 total=10", "uid=1001 over_budget=1 total=1"}
	if len(got) != len(want) {
		t.Fatalf("warnings %q, want %d", got, len(want))
	}
	for _, w := range want {
		found := false
		for _, g := range got {
			found = found || strings.Contains(g, w)
		}
		if !found {
			t.Errorf("no warning with %q in %q", w, got)
		}
	}
	if !strings.Contains(got[0], "sent to the overflow queue") || !strings.Contains(got[0], "budget_per_second=50") {
		t.Errorf("warning %q does not say what happened to the rest, or the budget", got[0])
	}
}

// logRecorder keeps the text of each record at WARNING or above.
type logRecorder struct {
	mu    sync.Mutex
	lines []string
}

func (r *logRecorder) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (r *logRecorder) WithAttrs([]slog.Attr) slog.Handler           { return r }
func (r *logRecorder) WithGroup(string) slog.Handler                { return r }
func (r *logRecorder) Handle(_ context.Context, rec slog.Record) error {
	b := rec.Message
	rec.Attrs(func(a slog.Attr) bool { b += " " + a.String(); return true })
	r.mu.Lock()
	r.lines = append(r.lines, b)
	r.mu.Unlock()
	return nil
}

func (r *logRecorder) warnings() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.lines...)
}

// A TCP socket's announced end ends its flow at once, unless a socket
// owns the tuple still (a TIME_WAIT socket took it over, or a new socket
// did): the sweep decides those. A flow of a socket gone before the daemon
// learned it (no cookie) is found by its tuple; a flow a new socket owns
// now (another cookie) stays.
func TestTCPSocketEndAnnounced(t *testing.T) {
	fx := newFixture(t)
	socks := &sockdiagtest.Sockets{}
	fx.addFlow(t, ipproto.TCP, sock(1001), 1) // gone: ends
	fx.addFlow(t, ipproto.TCP, sock(1002), 2) // in TIME_WAIT: stays
	fx.addFlow(t, ipproto.TCP, sock(1003), 0) // no cookie known, gone: ends
	fx.addFlow(t, ipproto.TCP, sock(1004), 4) // the announcement is an older socket's: stays
	socks.Add(ipproto.TCP, sockdiag.Socket{Local: sock(1002), Remote: peer, Cookie: 2, State: 6})
	announce := func(port uint16, cookie uint64) {
		// A dual-stack socket's announcement names IPv4 addresses mapped.
		mapped := func(a netip.AddrPort) netip.AddrPort {
			return netip.AddrPortFrom(netip.AddrFrom16(a.Addr().As16()), a.Port())
		}
		fx.env.tcpEnded(&sockdiag.Socket{Local: mapped(sock(port)), Remote: mapped(peer), Cookie: cookie}, socks)
	}
	announce(1001, 1)
	announce(1002, 2)
	announce(1003, 33)
	announce(1004, 3)
	announce(1005, 5) // no flow
	want := []netip.AddrPort{sock(1001), sock(1003)}
	if got := fx.removed(); !slices.Equal(got, want) {
		t.Fatalf("removed %v, want %v", got, want)
	}
	if n := fx.env.Shared.Stats.TCPClosed.Load(); n != 2 {
		t.Errorf("TCP flows ended by announcement: %d, want 2", n)
	}
	if !fx.env.Shared.ClosedTCP.Has(packet.ClosedKey(1005, peer.Addr())) || !fx.env.Shared.Closed.Has(5) {
		t.Error("an announced end is not kept for the learner")
	}

	// A socket reset (SO_LINGER 0) is announced without its source
	// address and destination port: kept for the learner, and its flow
	// left to the sweep (the table has no TCP cookie index).
	fx.addFlow(t, ipproto.TCP, sock(1007), 7)
	fx.env.tcpEnded(&sockdiag.Socket{Local: netip.AddrPortFrom(netip.IPv4Unspecified(), 1007), Remote: netip.AddrPortFrom(peer.Addr(), 0), Cookie: 7}, socks)
	if got := fx.removed(); len(got) != 2 {
		t.Fatalf("removed %v after a reset socket's end", got)
	}
	if !fx.env.Shared.ClosedTCP.Has(packet.ClosedKey(1007, peer.Addr())) {
		t.Error("a reset socket's end is not kept for the learner")
	}

	// A lookup that fails removes nothing, and is counted.
	fx.addFlow(t, ipproto.TCP, sock(1006), 6)
	fx.env.tcpEnded(&sockdiag.Socket{Local: sock(1006), Remote: peer, Cookie: 6}, &sockdiagtest.Sockets{LookupErr: unix.ENOBUFS})
	if got := fx.removed(); len(got) != 2 || fx.env.Shared.Stats.Errors[packet.ErrSocketLookup].Load() != 1 {
		t.Fatalf("removed %v, lookup errors %d", got, fx.env.Shared.Stats.Errors[packet.ErrSocketLookup].Load())
	}
}

// The watchers of sockets' ends stop when asked, at once and leaving no
// goroutine behind, on an idle host too, where the TCP watcher is blocked
// waiting for an announcement.
func TestWatchersStop(t *testing.T) {
	testenv.NeedRoot(t, "subscribing to sockets' ends needs CAP_NET_ADMIN")
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	fx := newFixture(t)
	for _, watch := range []func(Env) (func() error, error){WatchUDP, WatchTCP} {
		stop, err := watch(fx.env)
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
		start := time.Now()
		stopped := make(chan error, 1)
		go func() { stopped <- stop() }()
		select {
		case err := <-stopped:
			if err != nil {
				t.Fatal(err)
			}
			if d := time.Since(start); d > time.Second {
				t.Errorf("a watcher took %v to stop", d)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("a watcher did not stop within 5 s")
		}
	}
}
