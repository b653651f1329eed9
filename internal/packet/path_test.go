package packet

import (
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/queue"
	"github.com/rerouted/rerouted/internal/route"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/sockdiag/sockdiagtest"
	"github.com/rerouted/rerouted/internal/uplink"
	"golang.org/x/sys/unix"
)

// These tests run the packet path with fakes for everything it is given:
// no root, no namespace, no kernel. What they check is what the path
// decides and in what order: the verdicts, the bytes released, and the
// kernel changes installed before them.

var (
	ispA   = netip.MustParseAddr("192.0.2.2")    // the socket's source: ISP A's address
	ispB   = netip.MustParseAddr("198.51.100.2") // ISP B's
	server = netip.MustParseAddrPort("203.0.113.80:80")
	client = netip.AddrPortFrom(ispA, 40000)
)

const markB = 200

const testPolicy = `
[[uplink]]
name = "isp-b"
mark = 200

[[rule]]
name = "web-via-b"
uplink = "isp-b"
dport = [80, 53]
`

// event is one thing the path did, in order: a kernel transaction or a
// verdict.
type event struct {
	kind    string // "apply", "accept", "modified", "packet", "drop"
	id      uint32
	mark    uint32
	pkt     []byte
	changes []flow.Change
}

type recorder struct{ events []event }

func (r *recorder) add(e event) { r.events = append(r.events, e) }

// fakeQueue records verdicts.
type fakeQueue struct{ r *recorder }

func (q fakeQueue) Accept(id uint32) error { q.r.add(event{kind: "accept", id: id}); return nil }
func (q fakeQueue) Drop(id uint32) error   { q.r.add(event{kind: "drop", id: id}); return nil }
func (q fakeQueue) AcceptModified(id, mark uint32, pkt []byte) error {
	q.r.add(event{kind: "modified", id: id, mark: mark, pkt: append([]byte(nil), pkt...)})
	return nil
}
func (q fakeQueue) AcceptPacket(id uint32, pkt []byte) error {
	q.r.add(event{kind: "packet", id: id, pkt: append([]byte(nil), pkt...)})
	return nil
}

// fakeKernel records transactions, and refuses them while refuse is set.
type fakeKernel struct {
	r      *recorder
	refuse bool
}

func (k *fakeKernel) Apply(cs []flow.Change) error {
	if k.refuse {
		return unix.EINVAL
	}
	k.r.add(event{kind: "apply", changes: append([]flow.Change(nil), cs...)})
	return nil
}

type sockKey = sockdiagtest.Tuple

// fakeRoutes routes mark 200 via ISP B, anything else via ISP A.
type fakeRoutes struct{ noRoute bool }

func (r fakeRoutes) Lookup(dst netip.Addr, mark, uid uint32, hasUID bool) (route.Route, error) {
	switch {
	case r.noRoute:
		return route.Route{}, unix.ENETUNREACH
	case mark == markB:
		return route.Route{Src: ispB, Dev: "isp-b", DevIdx: 3, MTU: 1400}, nil
	}
	return route.Route{Src: ispA, Dev: "isp-a", DevIdx: 2, MTU: 1500}, nil
}

func (r fakeRoutes) Link(idx int) (route.Link, error) {
	return route.Link{Name: fmt.Sprintf("if%d", idx), MTU: 1500}, nil
}

type fakeOwners struct{}

func (fakeOwners) Process(inode, uid uint32, cg uint64) (owner.Process, bool) {
	return owner.Process{PID: 42, Comm: "curl", Exe: "/usr/bin/curl"}, true
}
func (fakeOwners) Cgroup(id uint64) (string, bool)                { return "system.slice/web.service", true }
func (fakeOwners) HasRawSocket(v6 bool, uid uint32) (bool, error) { return false, nil }

// world is a worker and everything around it.
type world struct {
	t      *testing.T
	r      *recorder
	w      *Worker
	s      *Shared
	socks  *sockdiagtest.Sockets
	kernel *fakeKernel
	routes *fakeRoutes
	failed []flow.Change
	nextID uint32
}

func newWorld(t *testing.T, conf string) *world {
	t.Helper()
	cfg, err := policy.Parse("test.toml", []byte(conf))
	if err != nil {
		t.Fatal(err)
	}
	wd := &world{t: t, r: &recorder{}, socks: &sockdiagtest.Sockets{}, routes: &fakeRoutes{}}
	wd.kernel = &fakeKernel{r: wd.r}
	var ptr atomic.Pointer[policy.Config]
	ptr.Store(cfg)
	wd.s = &Shared{Config: &ptr,
		Install: flow.NewInstaller(wd.kernel, func(c flow.Change, err error) { wd.failed = append(wd.failed, c) }),
		Uplinks: &uplink.States{}, Balance: &uplink.Balancer{}, Log: slog.New(slog.DiscardHandler), Stats: &Stats{},
		Decisions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "d"}, []string{"rule"}),
		Latency:   prometheus.NewHistogram(prometheus.HistogramOpts{Name: "l"}),
		PortLo:    32768, PortHi: 60999}
	wd.w = NewWorker(wd.s, fakeQueue{wd.r}, wd.socks, wd.routes, fakeOwners{})
	return wd
}

// socket makes a socket exist on a tuple.
func (wd *world) socket(proto ipproto.Proto, local, peer netip.AddrPort, cookie uint64) {
	wd.socks.Add(proto, sockdiag.Socket{Local: local, Remote: peer, UID: 1000, Inode: uint32(cookie), Cookie: cookie})
}

// send queues one outbound packet through the worker, and returns its id.
func (wd *world) send(pkt []byte, mark uint32) uint32 {
	wd.nextID++
	wd.w.Handle(&queue.Packet{ID: wd.nextID, Hook: queue.HookLocalOut, Payload: pkt, Mark: mark, UID: 1000, HasUID: true, OutDev: 2})
	return wd.nextID
}

// since returns the events after the first n.
func (wd *world) since(n int) []event { return wd.r.events[n:] }

func syn(t testing.TB, src, dst netip.AddrPort, mss uint16) []byte {
	tcp := &layers.TCP{SrcPort: layers.TCPPort(src.Port()), DstPort: layers.TCPPort(dst.Port()), Seq: 1, SYN: true, Window: 64240,
		Options: []layers.TCPOption{{OptionType: layers.TCPOptionKindMSS, OptionLength: 4, OptionData: []byte{byte(mss >> 8), byte(mss)}}}}
	return serialize(t, src, dst, layers.IPProtocolTCP, tcp, tcp)
}

func udp(t testing.TB, src, dst netip.AddrPort, payload string) []byte {
	u := &layers.UDP{SrcPort: layers.UDPPort(src.Port()), DstPort: layers.UDPPort(dst.Port())}
	return serialize(t, src, dst, layers.IPProtocolUDP, u, u, gopacket.Payload(payload))
}

func echo(t testing.TB, src, dst netip.Addr, id uint16) []byte {
	ic := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeEchoRequest, 0), Id: id, Seq: 1}
	return serialize(t, netip.AddrPortFrom(src, id), netip.AddrPortFrom(dst, id), layers.IPProtocolICMPv4, nil, ic, gopacket.Payload("ping"))
}

type checksummed interface {
	SetNetworkLayerForChecksum(gopacket.NetworkLayer) error
}

func serialize(t testing.TB, src, dst netip.AddrPort, proto layers.IPProtocol, l4 checksummed, ls ...gopacket.SerializableLayer) []byte {
	ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: proto, Id: 7, SrcIP: net.IP(src.Addr().AsSlice()), DstIP: net.IP(dst.Addr().AsSlice())}
	if l4 != nil {
		if err := l4.SetNetworkLayerForChecksum(ip); err != nil {
			t.Fatal(err)
		}
	}
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, append([]gopacket.SerializableLayer{ip}, ls...)...); err != nil {
		t.Fatal(err)
	}
	return append([]byte(nil), buf.Bytes()...)
}

// wire decodes a released packet as the wire would see it, and checks
// its checksums against gopacket's.
func wire(t *testing.T, pkt []byte) (src, dst netip.AddrPort, mss uint16) {
	t.Helper()
	p := gopacket.NewPacket(pkt, layers.LayerTypeIPv4, gopacket.Default)
	ip, _ := p.NetworkLayer().(*layers.IPv4)
	if ip == nil {
		t.Fatalf("released bytes are not IPv4: %v", p)
	}
	a, _ := netip.AddrFromSlice(ip.SrcIP)
	b, _ := netip.AddrFromSlice(ip.DstIP)
	var sport, dport uint16
	var l4 gopacket.SerializableLayer
	switch l := p.TransportLayer().(type) {
	case *layers.TCP:
		sport, dport = uint16(l.SrcPort), uint16(l.DstPort)
		for _, o := range l.Options {
			if o.OptionType == layers.TCPOptionKindMSS {
				mss = uint16(o.OptionData[0])<<8 | uint16(o.OptionData[1])
			}
		}
		if err := l.SetNetworkLayerForChecksum(ip); err != nil {
			t.Fatal(err)
		}
		l4 = l
	case *layers.UDP:
		sport, dport = uint16(l.SrcPort), uint16(l.DstPort)
		if err := l.SetNetworkLayerForChecksum(ip); err != nil {
			t.Fatal(err)
		}
		l4 = l
	}
	if l4 != nil { // gopacket recomputes the checksums: the bytes must not change
		buf := gopacket.NewSerializeBuffer()
		ip2 := *ip
		if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{ComputeChecksums: true}, &ip2, l4, gopacket.Payload(p.TransportLayer().LayerPayload())); err != nil {
			t.Fatal(err)
		}
		if string(buf.Bytes()) != string(pkt) {
			t.Fatalf("released packet's checksums are wrong:\n got %x\nwant %x", pkt, buf.Bytes())
		}
	}
	return netip.AddrPortFrom(a.Unmap(), sport), netip.AddrPortFrom(b.Unmap(), dport), mss
}

// A rule-matched SYN is rewritten to ISP B's address with ISP B's mark and
// MSS, and released only after its flow's elements are applied.
func TestSYNTranslatedAfterItsElements(t *testing.T) {
	wd := newWorld(t, testPolicy)
	wd.socket(ipproto.TCP, client, server, 7)
	id := wd.send(syn(t, client, server, 1460), 0)
	if len(wd.r.events) != 0 {
		t.Fatalf("the SYN left before the batch's end: %+v", wd.r.events)
	}
	wd.w.EndBatch()
	ev := wd.r.events
	if len(ev) != 2 || ev[0].kind != "apply" || ev[1].kind != "modified" || ev[1].id != id {
		t.Fatalf("want the elements applied, then the SYN released; got %+v", ev)
	}
	c := ev[0].changes
	if len(c) != 1 || c[0].Delete || c[0].Flow.NewSrc != netip.AddrPortFrom(ispB, client.Port()) || c[0].Flow.Mark != markB {
		t.Fatalf("installed %+v", c)
	}
	if ev[1].mark != markB {
		t.Fatalf("released with mark %d, want %d", ev[1].mark, markB)
	}
	src, dst, mss := wire(t, ev[1].pkt)
	if src != netip.AddrPortFrom(ispB, client.Port()) || dst != server {
		t.Fatalf("on the wire %v -> %v, want %v:%d -> %v", src, dst, ispB, client.Port(), server)
	}
	if mss != 1400-40 {
		t.Fatalf("MSS %d, want %d (ISP B's MTU 1400)", mss, 1400-40)
	}
	f := wd.s.Install.Table().Get(flow.Key{Proto: ipproto.TCP, Src: client, Dst: server})
	if f == nil || f.Rule != "web-via-b" || f.Cookie != 7 || f.Dev != "isp-b" {
		t.Fatalf("flow %+v", f)
	}
	if got := wd.s.Stats.Translated.Load(); got != 1 {
		t.Fatalf("translated = %d", got)
	}

	// Its retransmission: the same translation, no new elements.
	n := len(wd.r.events)
	wd.send(syn(t, client, server, 1460), 0)
	wd.w.EndBatch()
	ev = wd.since(n)
	if len(ev) != 1 || ev[0].kind != "modified" {
		t.Fatalf("retransmitted SYN: %+v", ev)
	}
	if src, _, _ := wire(t, ev[0].pkt); src.Addr() != ispB {
		t.Fatalf("retransmitted SYN left from %v", src)
	}
	if wd.s.Stats.Retrans.Load() != 1 {
		t.Fatal("retransmission not counted")
	}

	// A new socket on the same tuple (another cookie): the old flow is
	// removed first, in order, then the new one installed.
	wd.socket(ipproto.TCP, client, server, 8)
	n = len(wd.r.events)
	wd.send(syn(t, client, server, 1460), 0)
	wd.w.EndBatch()
	ev = wd.since(n)
	if len(ev) != 2 || ev[0].kind != "apply" || len(ev[0].changes) != 2 || !ev[0].changes[0].Delete || ev[0].changes[1].Delete ||
		ev[0].changes[1].Flow.Cookie != 8 || ev[1].kind != "modified" || ev[1].mark != markB {
		t.Fatalf("a new socket on a translated tuple: want the old flow removed and the new installed, then its SYN released; got %+v", ev)
	}
}

// What the path does with first packets it must not translate, or cannot.
func TestFirstPacketVerdicts(t *testing.T) {
	other := netip.MustParseAddrPort("203.0.113.80:22") // no rule concerns it
	cases := []struct {
		name   string
		setup  func(wd *world)
		pkt    func(t *testing.T) []byte
		closed bool   // on_failure = "closed"
		want   string // the verdict
		fail   FailReason
		failed bool
		// installed: the flow's elements went in before the verdict, with
		// this wire source and mark (and nothing else was installed).
		installed netip.AddrPort
	}{
		{name: "no rule matches", setup: func(wd *world) { wd.socket(ipproto.TCP, client, other, 1) },
			pkt: func(t *testing.T) []byte { return syn(t, client, other, 1460) }, want: "accept"},
		{name: "socket closed before the lookup", pkt: func(t *testing.T) []byte { return syn(t, client, server, 1460) },
			want: "accept", fail: FailNoSocket, failed: true},
		{name: "socket closed, fail closed", pkt: func(t *testing.T) []byte { return syn(t, client, server, 1460) },
			closed: true, want: "drop", fail: FailNoSocket, failed: true},
		{name: "sock_diag fails", setup: func(wd *world) { wd.socks.LookupErr = unix.ENOBUFS },
			pkt: func(t *testing.T) []byte { return syn(t, client, server, 1460) }, want: "accept", fail: FailSocketLookup, failed: true},
		{name: "no route for the mark", setup: func(wd *world) { wd.socket(ipproto.TCP, client, server, 1); wd.routes.noRoute = true },
			pkt: func(t *testing.T) []byte { return syn(t, client, server, 1460) }, want: "accept", fail: FailNoRoute, failed: true},
		{name: "no route, fail closed", setup: func(wd *world) { wd.socket(ipproto.TCP, client, server, 1); wd.routes.noRoute = true },
			pkt: func(t *testing.T) []byte { return syn(t, client, server, 1460) }, closed: true, want: "drop", fail: FailNoRoute, failed: true},
		{name: "the socket already has ISP B's address", setup: func(wd *world) {
			wd.socket(ipproto.TCP, netip.AddrPortFrom(ispB, 40000), server, 1)
		}, pkt: func(t *testing.T) []byte { return syn(t, netip.AddrPortFrom(ispB, 40000), server, 1460) }, want: "modified",
			installed: netip.AddrPortFrom(ispB, 40000)}, // same address: only the mark is pinned
		{name: "udp, the socket's lookup fails once", setup: func(wd *world) { wd.socks.FailFirst = 1 },
			pkt: func(t *testing.T) []byte { return udp(t, client, netip.AddrPortFrom(server.Addr(), 53), "q") }, want: "modified",
			installed: netip.AddrPortFrom(ispB, client.Port())}, // decided without the socket, by the queue's uid
		{name: "udp, sock_diag fails", setup: func(wd *world) { wd.socks.LookupErr = unix.ENOBUFS },
			// The new source port cannot be checked: not translated.
			pkt:  func(t *testing.T) []byte { return udp(t, client, netip.AddrPortFrom(server.Addr(), 53), "q") },
			want: "accept", fail: FailSocketLookup, failed: true},
		{name: "tcp, the port check fails", setup: func(wd *world) {
			wd.socket(ipproto.TCP, client, server, 1)
			wd.socks.FailAt = map[sockKey]bool{{Proto: ipproto.TCP, Local: netip.AddrPortFrom(ispB, client.Port()), Remote: server}: true}
		}, pkt: func(t *testing.T) []byte { return syn(t, client, server, 1460) }, want: "accept", fail: FailSocketLookup, failed: true},
		{name: "udp, sock_diag fails, fail closed", setup: func(wd *world) { wd.socks.LookupErr = unix.ENOBUFS },
			pkt: func(t *testing.T) []byte { return udp(t, client, netip.AddrPortFrom(server.Addr(), 53), "q") }, closed: true,
			want: "drop", fail: FailSocketLookup, failed: true},
		{name: "an ACK is not a first packet", pkt: func(t *testing.T) []byte {
			tcp := &layers.TCP{SrcPort: 40000, DstPort: 80, ACK: true, Window: 1}
			return serialize(t, client, server, layers.IPProtocolTCP, tcp, tcp)
		}, want: "accept"},
		{name: "garbage", pkt: func(t *testing.T) []byte { return []byte{0x45, 0, 0} }, want: "accept"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			wd := newWorld(t, testPolicy)
			wd.s.FailClosed = c.closed
			if c.setup != nil {
				c.setup(wd)
			}
			id := wd.send(c.pkt(t), 0)
			wd.w.EndBatch()
			var got []string
			var applied []flow.Change
			for _, e := range wd.r.events {
				if e.kind == "apply" {
					if len(got) != 0 {
						t.Fatalf("elements installed after the verdict: %+v", wd.r.events)
					}
					applied = append(applied, e.changes...)
					continue
				}
				got = append(got, e.kind)
				if e.id != id {
					t.Fatalf("verdict for id %d, want %d", e.id, id)
				}
				if e.kind == "modified" {
					if e.mark != markB {
						t.Fatalf("released with mark %d, want %d", e.mark, markB)
					}
					if src, _, _ := wire(t, e.pkt); src != c.installed {
						t.Fatalf("left from %v, want %v", src, c.installed)
					}
				}
			}
			if len(got) != 1 || got[0] != c.want {
				t.Fatalf("verdicts %v, want [%s]", got, c.want)
			}
			switch {
			case c.installed.IsValid() && (len(applied) != 1 || applied[0].Delete || applied[0].Flow.NewSrc != c.installed || applied[0].Flow.Mark != markB):
				t.Fatalf("installed %v, want one flow from %v with mark %d", describe(applied), c.installed, markB)
			case !c.installed.IsValid() && len(applied) != 0:
				t.Fatalf("installed %v for a flow left untranslated", describe(applied))
			}
			var total uint64
			for i := range wd.s.Stats.Failed {
				total += wd.s.Stats.Failed[i].Load()
			}
			if c.failed && (wd.s.Stats.Failed[c.fail].Load() != 1 || total != 1) {
				t.Fatalf("failed counters %v, want one %s", counts(wd.s.Stats), FailReasonNames[c.fail])
			}
			if !c.failed && total != 0 {
				t.Fatalf("failed counters %v, want none", counts(wd.s.Stats))
			}
		})
	}
}

func describe(cs []flow.Change) string {
	s := ""
	for _, c := range cs {
		s += fmt.Sprintf("{%v -> %v mark %d pass %v delete %v} ", c.Flow.Src, c.Flow.NewSrc, c.Flow.Mark, c.Flow.Pass, c.Delete)
	}
	return s
}

func counts(s *Stats) map[string]uint64 {
	m := map[string]uint64{}
	for i := range s.Failed {
		if n := s.Failed[i].Load(); n != 0 {
			m[FailReasonNames[i]] = n
		}
	}
	return m
}

// A flow whose elements the kernel refuses leaves the table and its SYN is
// dropped (the socket retransmits, and is decided again): never released
// without its elements.
func TestRefusedElementsDropTheSYN(t *testing.T) {
	wd := newWorld(t, testPolicy)
	wd.socket(ipproto.TCP, client, server, 7)
	wd.kernel.refuse = true
	wd.send(syn(t, client, server, 1460), 0)
	wd.w.EndBatch()
	if len(wd.r.events) != 1 || wd.r.events[0].kind != "drop" {
		t.Fatalf("want the SYN dropped; got %+v", wd.r.events)
	}
	if len(wd.failed) != 1 || wd.s.Install.Table().Len() != 0 {
		t.Fatalf("refused change reported %d times; flows left %d", len(wd.failed), wd.s.Install.Table().Len())
	}
	wd.kernel.refuse = false
	wd.send(syn(t, client, server, 1460), 0)
	wd.w.EndBatch()
	if ev := wd.r.events; len(ev) != 3 || ev[1].kind != "apply" || ev[2].kind != "modified" {
		t.Fatalf("the retransmission: %+v", ev)
	}
}

// When the socket's own port is taken on ISP B's address (by a real
// socket there), the translation takes another port from the ephemeral
// range, and the wire tuple is the one installed.
func TestCollidingWireTupleGetsAnotherPort(t *testing.T) {
	wd := newWorld(t, testPolicy)
	wd.socket(ipproto.TCP, client, server, 7)
	wd.socket(ipproto.TCP, netip.AddrPortFrom(ispB, client.Port()), server, 99) // another program's
	wd.send(syn(t, client, server, 1460), 0)
	wd.w.EndBatch()
	ev := wd.r.events
	if len(ev) != 2 || ev[1].kind != "modified" {
		t.Fatalf("%+v", ev)
	}
	src, _, _ := wire(t, ev[1].pkt)
	if src.Addr() != ispB || src.Port() == client.Port() || src.Port() < wd.s.PortLo || src.Port() > wd.s.PortHi {
		t.Fatalf("left from %v", src)
	}
	if got := ev[0].changes[0].Flow.NewSrc; got != src {
		t.Fatalf("installed %v, released %v", got, src)
	}
}

// A UDP flow's datagrams keep their order: the second, sent before the
// first's elements are in, waits behind it; later ones go at once.
func TestDatagramsFollowTheirFirst(t *testing.T) {
	wd := newWorld(t, testPolicy)
	dns := netip.AddrPortFrom(server.Addr(), 53)
	wd.socket(ipproto.UDP, client, dns, 5)
	a := wd.send(udp(t, client, dns, "one"), 0)
	b := wd.send(udp(t, client, dns, "two"), 0)
	if len(wd.r.events) != 0 {
		t.Fatalf("datagrams left before their elements: %+v", wd.r.events)
	}
	wd.w.EndBatch()
	c := wd.send(udp(t, client, dns, "three"), 0)
	ev := wd.r.events
	if len(ev) != 4 || ev[0].kind != "apply" || ev[1].id != a || ev[2].id != b || ev[3].id != c {
		t.Fatalf("want apply, %d, %d, %d in order; got %+v", a, b, c, ev)
	}
	for _, e := range ev[1:] {
		if src, _, _ := wire(t, e.pkt); e.kind != "modified" || e.mark != markB || src != netip.AddrPortFrom(ispB, client.Port()) {
			t.Fatalf("datagram %d: %s from %v mark %d", e.id, e.kind, src, e.mark)
		}
	}
	if wd.s.Stats.Datagrams.Load() != 1 {
		t.Fatalf("datagram flows decided: %d, want 1", wd.s.Stats.Datagrams.Load())
	}
}

// A datagram routing already sends right is passed, and the pass is
// cached in the kernel at the batch's end, so the tuple's next datagrams
// never come back.
func TestDatagramPassIsCached(t *testing.T) {
	wd := newWorld(t, testPolicy)
	ntp := netip.AddrPortFrom(server.Addr(), 123) // no rule
	wd.socket(ipproto.UDP, client, ntp, 5)
	id := wd.send(udp(t, client, ntp, "x"), 0)
	ev := wd.r.events
	if len(ev) != 1 || ev[0].kind != "accept" || ev[0].id != id {
		t.Fatalf("%+v", ev)
	}
	wd.w.EndBatch()
	ev = wd.r.events
	if len(ev) != 2 || ev[1].kind != "apply" || !ev[1].changes[0].Flow.Pass {
		t.Fatalf("the pass was not installed at the batch's end: %+v", ev)
	}
}

// A ping is translated with its identifier kept; a second ping with the
// same identifier, already on the wire from ISP B's address to the same
// peer, cannot be, and fails open.
func TestEchoKeepsItsIdentifier(t *testing.T) {
	conf := testPolicy + "\n[[rule]]\nname = \"ping-via-b\"\nuplink = \"isp-b\"\nprotocol = \"icmp\"\n"
	wd := newWorld(t, conf)
	wd.send(echo(t, ispA, server.Addr(), 77), 0)
	wd.w.EndBatch()
	ev := wd.r.events
	if len(ev) != 2 || ev[1].kind != "modified" || ev[0].changes[0].Flow.NewSrc != netip.AddrPortFrom(ispB, 77) {
		t.Fatalf("%+v", ev)
	}
	p := gopacket.NewPacket(ev[1].pkt, layers.LayerTypeIPv4, gopacket.Default)
	ic, _ := p.Layer(layers.LayerTypeICMPv4).(*layers.ICMPv4)
	if ip := p.NetworkLayer().(*layers.IPv4); !ip.SrcIP.Equal(ispB.AsSlice()) || ic == nil || ic.Id != 77 {
		t.Fatalf("echo left as %v", p)
	}
	other := netip.MustParseAddr("192.0.2.3") // another address of the host, same identifier
	wd.send(echo(t, other, server.Addr(), 77), 0)
	wd.w.EndBatch()
	if ev := wd.r.events; ev[len(ev)-1].kind != "accept" || wd.s.Stats.Failed[FailEchoID].Load() != 1 {
		t.Fatalf("a clashing echo: %+v, failed %v", ev[len(ev)-1], counts(wd.s.Stats))
	}
}

// An ICMP error about a translated flow, addressed to the wire's source,
// is readdressed to the socket.
func TestICMPErrorReaddressed(t *testing.T) {
	wd := newWorld(t, testPolicy)
	wd.socket(ipproto.TCP, client, server, 7)
	wd.send(syn(t, client, server, 1460), 0)
	wd.w.EndBatch()
	onWire := wd.r.events[1].pkt
	// "fragmentation needed" from a router, quoting the SYN as it left.
	router := netip.MustParseAddr("203.0.113.1")
	ic := &layers.ICMPv4{TypeCode: layers.CreateICMPv4TypeCode(layers.ICMPv4TypeDestinationUnreachable, layers.ICMPv4CodeFragmentationNeeded)}
	icmpPkt := serialize(t, netip.AddrPortFrom(router, 0), netip.AddrPortFrom(ispB, 0), layers.IPProtocolICMPv4, nil, ic, gopacket.Payload(onWire[:28]))
	n := len(wd.r.events)
	wd.w.Handle(&queue.Packet{ID: 50, Hook: queue.HookPreRouting, Payload: icmpPkt})
	ev := wd.since(n)
	if len(ev) != 1 || ev[0].kind != "packet" {
		t.Fatalf("%+v", ev)
	}
	p := gopacket.NewPacket(ev[0].pkt, layers.LayerTypeIPv4, gopacket.Default)
	if ip := p.NetworkLayer().(*layers.IPv4); !ip.DstIP.Equal(ispA.AsSlice()) {
		t.Fatalf("error sent to %v, want the socket's %v", ip.DstIP, ispA)
	}
	if wd.s.Stats.ICMPErrors.Load() != 1 {
		t.Fatal("not counted")
	}
}

// The verdicts of a first packet that needs no translation, of a
// retransmitted SYN, and of one that fails open (a flood of them is what a
// local user can send) allocate nothing.
func TestPathAllocatesNothing(t *testing.T) {
	wd := newWorld(t, testPolicy)
	other := netip.MustParseAddrPort("203.0.113.80:22")
	wd.socket(ipproto.TCP, client, other, 1)
	wd.socket(ipproto.TCP, client, server, 7)
	pass, retrans := syn(t, client, other, 1460), syn(t, client, server, 1460)
	wd.send(syn(t, client, server, 1460), 0) // (the path rewrites the bytes it holds)
	wd.w.EndBatch()
	p := &queue.Packet{Hook: queue.HookLocalOut, UID: 1000, HasUID: true}
	wd.r.events = make([]event, 0, 1024)
	q := nopQueue{}
	wd.w.q = q
	gone := syn(t, netip.AddrPortFrom(ispA, 40001), server, 1460) // its socket closed: fails open
	for name, pkt := range map[string][]byte{"no rule matches": pass, "retransmitted SYN": retrans, "failed open": gone} {
		buf := make([]byte, len(pkt))
		allocs := testing.AllocsPerRun(200, func() {
			copy(buf, pkt)
			p.Payload = buf
			wd.w.Handle(p)
			wd.w.EndBatch()
		})
		if allocs != 0 {
			t.Errorf("%s: %.1f allocations per packet", name, allocs)
		}
	}
}

type nopQueue struct{}

func (nopQueue) Accept(uint32) error                         { return nil }
func (nopQueue) Drop(uint32) error                           { return nil }
func (nopQueue) AcceptModified(uint32, uint32, []byte) error { return nil }
func (nopQueue) AcceptPacket(uint32, []byte) error           { return nil }
