package daemon

import (
	"errors"
	"math/rand/v2"
	"net/netip"
	"time"

	"github.com/rerouted/rerouted/flow"
	"github.com/rerouted/rerouted/policy"
	"github.com/rerouted/rerouted/queue"
	"github.com/rerouted/rerouted/rewrite"
	"github.com/rerouted/rerouted/sockdiag"
	"golang.org/x/sys/unix"
)

// The packet path. The kernel queues:
//   - every locally originated TCP SYN (handle -> syn): the decision;
//   - ICMP and ICMPv6 errors (icmpError): those about a translated flow are
//     readdressed to its socket;
//   - with the userspace datapath only, every other packet of a translated
//     flow (forward). With the kernel datapath they are rewritten in the
//     kernel by map elements and never come here.
//
// A worker handles one queue. It decides each SYN as it arrives and holds
// the rewritten SYNs of translated flows until the end of the queue's batch
// (the queue is empty, or full); then one transaction installs the whole
// batch's elements and the SYNs go out. So the SYN-ACK always finds its
// elements, and concurrent connections share a transaction.
//
// Every packet gets exactly one verdict. The path fails open: whatever goes
// wrong, the packet leaves as the host's own routing would send it, or is
// dropped for the socket to retransmit when that is the only way to avoid a
// wrong translation.

// worker is one queue's packet goroutine and the sockets it owns.
type worker struct {
	d      *Daemon
	q      *queue.Queue
	diag   *sockdiag.Conn
	routes *router
	owner  sockOwner   // the socket being decided
	query  policy.Flow // the flow being decided (reused: no allocation)

	held  [maxHeld]heldSYN // rewritten SYNs waiting for their elements
	nheld int
}

// heldSYN is a rewritten SYN waiting for the batch's transaction. Its bytes
// stay in the queue's buffer until the batch ends.
type heldSYN struct {
	id  uint32
	f   *flow.Flow
	pkt []byte
}

// maxHeld bounds the SYNs held in one batch.
const maxHeld = 128

// What an MSS leaves out of the MTU: the IP and TCP headers.
const (
	tcpIPv4Headers = 40
	tcpIPv6Headers = 60
)

func (w *worker) handle(p *queue.Packet) {
	var t rewrite.Packet
	if err := rewrite.ParseTCP(p.Payload, &t); err != nil {
		var e rewrite.ICMPError
		if errors.Is(err, rewrite.ErrNotTCP) && rewrite.ParseICMPError(p.Payload, &e) == nil {
			w.icmpError(p, &e)
			return
		}
		w.accept(p) // not ours to judge
		return
	}
	switch {
	case t.Flags&(rewrite.SYN|rewrite.ACK|rewrite.FIN|rewrite.RST) == rewrite.SYN && p.Hook == queue.HookLocalOut:
		w.d.stats.syns.Add(1)
		w.syn(p, &t)
	case w.d.userspace:
		w.forward(p, &t)
	default:
		w.accept(p)
	}
}

// forward translates one packet of a translated flow, the userspace
// datapath's job for every packet after the SYN: outbound from the socket's
// tuple to the wire's, with the flow's mark; inbound back.
func (w *worker) forward(p *queue.Packet, t *rewrite.Packet) {
	d := w.d
	d.stats.forwarded.Add(1)
	d.stats.bytes.Add(uint64(len(p.Payload)))
	if p.Hook == queue.HookLocalOut {
		f := d.flows.Get(flow.Key{Proto: unix.IPPROTO_TCP, Src: t.Src, Dst: t.Dst})
		if f == nil {
			w.accept(p) // its socket is gone; the selector follows
			return
		}
		rewrite.SetSource(p.Payload, t, f.NewSrc)
		rewrite.Checksum(p.Payload, t)
		if err := w.q.AcceptModified(p.ID, f.Mark, p.Payload); err != nil {
			d.log.Error("verdict", "id", p.ID, "err", err)
		}
		return
	}
	f := d.flows.ByWire(flow.Key{Proto: unix.IPPROTO_TCP, Src: t.Dst, Dst: t.Src})
	if f == nil {
		w.accept(p)
		return
	}
	rewrite.SetDestination(p.Payload, t, f.Src)
	rewrite.Checksum(p.Payload, t)
	if err := w.q.AcceptPacket(p.ID, p.Payload); err != nil {
		d.log.Error("verdict", "id", p.ID, "err", err)
	}
}

// syn decides a new connection and releases its SYN.
func (w *worker) syn(p *queue.Packet, t *rewrite.Packet) {
	d := w.d
	key := flow.Key{Proto: unix.IPPROTO_TCP, Src: t.Src, Dst: t.Dst}

	// 1. The socket. Its cookie tells a retransmitted SYN from a new socket
	// that reuses the tuple; its existence is what later ends the flow.
	var sock sockdiag.Socket
	if err := w.diag.Lookup(unix.IPPROTO_TCP, t.Src, t.Dst, &sock); err != nil {
		if !errors.Is(err, sockdiag.ErrNotFound) {
			d.log.Error("socket lookup", "src", t.Src, "dst", t.Dst, "err", err)
		}
		// No socket (a raw socket's SYN, or one closed already): nothing
		// could tell us when the flow ends, so it is not translated.
		w.accept(p)
		return
	}
	if f := d.flows.Get(key); f != nil {
		if f.Cookie == sock.Cookie {
			d.stats.retrans.Add(1)
			w.hold(p, t, f) // a retransmitted SYN: same translation
			return
		}
		// A new socket reuses a tuple whose old socket we have not yet
		// swept: the old translation must not leak onto it.
		d.forget(f)
	}

	// 2. The mark: the host's own, else the first matching rule's.
	cfg := d.cfg.Load()
	mark, ruleName := w.decide(cfg, &sock, p.Mark, p.GID, t.Dst)

	// 3. The route that mark leads to, and its preferred source.
	rt := route{Src: t.Src.Addr(), DevIdx: int(p.OutDev)}
	if mark != 0 {
		var err error
		if rt, err = w.routes.lookup(t.Dst.Addr(), mark, sock.UID, true); err != nil {
			d.log.Warn("no route for marked flow; leaving it untranslated", "src", t.Src, "dst", t.Dst, "mark", mark, "err", err)
			w.accept(p)
			return
		}
	}
	want := netip.AddrPortFrom(rt.Src, t.Src.Port())
	onWire := d.flows.OnWire(flow.Key{Proto: unix.IPPROTO_TCP, Src: want, Dst: t.Dst})
	if rt.Src == t.Src.Addr() && mark == p.Mark && !onWire {
		w.accept(p) // routing already gets it right: costs nothing from now on
		return
	}

	// 4. The flow.
	f := &flow.Flow{Key: key, Mark: mark, Rule: ruleName, UID: sock.UID, Cookie: sock.Cookie, Inode: sock.Inode,
		Start: time.Now(), Dev: rt.Dev}
	headers := tcpIPv4Headers
	if t.Src.Addr().Is6() {
		headers = tcpIPv6Headers
	}
	if rt.MTU > headers {
		f.MSS = uint16(min(rt.MTU-headers, 0xffff))
	}
	if f.Dev == "" {
		if li, err := w.routes.link(rt.DevIdx); err == nil {
			f.Dev = li.name
		}
	}
	w.describeOwner(f)

	// 5. A source port: the socket's own unless that tuple is taken on the
	// wire by a real socket or another translation. The flow table takes
	// it atomically, and its kernel elements are queued, in table order.
	if !w.admit(f, want, t.Dst, sock.Cookie, onWire) {
		d.log.Error("no free source port for translation; dropping SYN (the socket will retry)", "src", t.Src, "dst", t.Dst, "new_src", rt.Src)
		w.drop(p)
		return
	}
	d.stats.translated.Add(1)
	d.events.write("NEW", f)

	// 6. The SYN itself, rewritten, goes out once its elements are in.
	w.hold(p, t, f)
}

// icmpError readdresses an ICMP error about a translated flow to its socket:
// the error was sent to the wire's source and quotes the wire's tuple, and
// the socket (path MTU discovery above all) only recognises its own.
func (w *worker) icmpError(p *queue.Packet, e *rewrite.ICMPError) {
	f := w.d.flows.ByWire(flow.Key{Proto: unix.IPPROTO_TCP, Src: e.Src, Dst: e.To})
	if f == nil || e.Dst != f.NewSrc.Addr() {
		w.accept(p) // not about a translated flow
		return
	}
	rewrite.TranslateICMPError(p.Payload, e, f.Src)
	w.d.stats.icmpErrors.Add(1)
	w.d.log.Debug("icmp error readdressed", "type", e.Type, "code", e.Code, "wire", f.NewSrc, "socket", f.Src, "dst", f.Dst)
	if err := w.q.AcceptPacket(p.ID, p.Payload); err != nil {
		w.d.log.Error("verdict", "id", p.ID, "err", err)
	}
}

// decide returns the mark a new connection must carry and what decided it:
// the mark the host's own rules set (with honor_marks), else the first
// matching rule's; mark 0 means the normal route. The owner (process,
// cgroup) is looked up only if a rule needs it.
func (w *worker) decide(cfg *policy.Config, sock *sockdiag.Socket, pktMark, gid uint32, dst netip.AddrPort) (uint32, string) {
	w.owner.reset(sock)
	if cfg.Daemon.HonorMarks && pktMark != 0 {
		return pktMark, "host mark"
	}
	w.query = policy.Flow{Protocol: "tcp", Dst: dst, UID: sock.UID, GID: gid, HasUID: true, Owner: &w.owner}
	r := cfg.Decide(&w.query)
	switch {
	case r == nil:
		return 0, ""
	case r.Action.Kind == policy.ActDefault: // pinned to the normal route
		return 0, r.Name
	}
	return r.Action.Mark, r.Name
}

// describeOwner records on f the owner the decision looked up, and with
// --debug also what it did not need, for the event line.
func (w *worker) describeOwner(f *flow.Flow) {
	o := &w.owner
	var fo flow.Owner
	if w.d.events != nil || o.procDone {
		if p, ok := o.Process(); ok {
			fo.PID, fo.Comm, fo.Exe = p.PID, p.Comm, p.Exe
		}
	}
	if w.d.events != nil || o.cgDone {
		if cg, ok := o.Cgroup(); ok {
			fo.Cgroup = "/" + cg
		}
	}
	if fo != (flow.Owner{}) {
		f.Owner = &fo
	}
}

// admit gives f a wire tuple no real socket and no other flow uses, and adds
// it to the table and the kernel's queue of changes: want if it is free,
// else the same address with a random port from the ephemeral range.
func (w *worker) admit(f *flow.Flow, want, dst netip.AddrPort, cookie uint64, taken bool) bool {
	d := w.d
	span := uint32(d.portHi-d.portLo) + 1
	for try := 0; try < 64; try++ {
		c := want
		if taken || try > 0 {
			c = netip.AddrPortFrom(want.Addr(), d.portLo+uint16(rand.Uint32N(span)))
		}
		if !w.noOtherSocket(c, dst, cookie) {
			continue
		}
		f.NewSrc = c
		d.mu.Lock()
		f.Seq = d.inst.next + 1
		ok := d.flows.Reserve(f)
		if ok {
			d.inst.enqueue(f, false)
		}
		d.mu.Unlock()
		if ok {
			return true
		}
	}
	return false
}

// noOtherSocket reports whether no socket but the flow's own uses src→dst.
func (w *worker) noOtherSocket(src, dst netip.AddrPort, cookie uint64) bool {
	var s sockdiag.Socket
	err := w.diag.Lookup(unix.IPPROTO_TCP, src, dst, &s)
	if errors.Is(err, sockdiag.ErrNotFound) {
		return true
	}
	return err == nil && s.Cookie == cookie
}

// hold rewrites a flow's SYN and keeps it until the batch's elements are
// installed (see endBatch).
func (w *worker) hold(p *queue.Packet, t *rewrite.Packet, f *flow.Flow) {
	rewrite.SetSource(p.Payload, t, f.NewSrc)
	if f.MSS != 0 {
		rewrite.ClampMSS(p.Payload, t, f.MSS)
	}
	rewrite.Checksum(p.Payload, t)
	if w.nheld == maxHeld { // rare: more SYNs than a batch holds
		w.d.inst.flush()
		w.release(p.ID, f, p.Payload)
		return
	}
	w.held[w.nheld] = heldSYN{id: p.ID, f: f, pkt: p.Payload}
	w.nheld++
}

// endBatch runs before the queue sends its batch of verdicts: install the
// batch's elements in one transaction, then release its SYNs.
func (w *worker) endBatch() {
	if w.nheld == 0 {
		return
	}
	w.d.inst.flush()
	for i := 0; i < w.nheld; i++ {
		h := &w.held[i]
		w.release(h.id, h.f, h.pkt)
		*h = heldSYN{}
	}
	w.nheld = 0
}

// release lets a rewritten SYN go with its flow's mark; the kernel routes it
// again because its source and mark changed. A flow whose elements could
// not be installed has left the table: its SYN is dropped.
func (w *worker) release(id uint32, f *flow.Flow, pkt []byte) {
	if w.d.flows.Get(f.Key) != f {
		w.dropID(id)
		return
	}
	if err := w.q.AcceptModified(id, f.Mark, pkt); err != nil {
		w.d.log.Error("verdict", "id", id, "err", err)
	}
}

func (w *worker) accept(p *queue.Packet) {
	if err := w.q.Accept(p.ID); err != nil {
		w.d.log.Error("verdict", "id", p.ID, "err", err)
	}
}

func (w *worker) drop(p *queue.Packet) { w.dropID(p.ID) }

func (w *worker) dropID(id uint32) {
	w.d.stats.dropped.Add(1)
	if err := w.q.Drop(id); err != nil {
		w.d.log.Error("verdict", "id", id, "err", err)
	}
}
