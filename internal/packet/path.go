// Package packet is rerouted's packet path: the first packet of each new
// local flow arrives from a queue, and leaves decided. The kernel queues:
//   - every locally originated TCP SYN (Handle -> syn): the decision;
//   - the first outbound UDP datagram or ICMP/ICMPv6 echo request of every
//     tuple without a decision (datagram): the decision, translated or not,
//     which the kernel then caches;
//   - ICMP and ICMPv6 errors (icmpError): those about a translated flow are
//     readdressed to its socket;
//   - with the userspace datapath only, every other packet of a translated
//     flow (forward). With the kernel datapath they are rewritten in the
//     kernel by map elements and never come here.
//
// A Worker handles one queue. It decides each new flow as its first packet
// arrives and holds the rewritten packets of translated flows until the end
// of the queue's batch (the queue is empty, or full); then one transaction
// installs the whole batch's elements and the packets go out. So the reply
// always finds its elements, and concurrent flows share a transaction.
//
// Every packet gets exactly one verdict. The path fails open: whatever goes
// wrong, the packet leaves as the host's own routing would send it, or is
// dropped for the socket to retransmit when that is the only way to avoid a
// wrong translation.
//
// This file is the path, top to bottom; seams.go has what it is given.
package packet

import (
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rerouted/rerouted/internal/events"
	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/queue"
	"github.com/rerouted/rerouted/internal/rewrite"
	"github.com/rerouted/rerouted/internal/route"
	"github.com/rerouted/rerouted/internal/sockdiag"
)

// Worker is one queue's packet path and the sockets it owns.
type Worker struct {
	s      *Shared
	q      Verdicts
	diag   sockdiag.Sockets
	routes Routes
	owner  sockOwner   // the socket being decided
	query  policy.Flow // the flow being decided (reused: no allocation)

	held  [maxHeld]heldPacket // rewritten first packets waiting for their elements
	nheld int
	// passed: the batch cached a decision not to translate, whose
	// element must go in at its end even with no packet held for it.
	passed bool

	ruleCounters map[string]prometheus.Counter // decisions by rule (decided)
	vainWait     time.Time                     // the last wait for the learner that found nothing (mayWait)
}

// heldPacket is a rewritten first packet (a SYN, a datagram, an echo request)
// waiting for the batch's transaction. Its bytes stay in the queue's buffer
// until the batch ends.
type heldPacket struct {
	id  uint32
	f   *flow.Flow
	pkt []byte
}

// maxHeld bounds the first packets held in one batch.
const maxHeld = 128

// learnerWaits bounds how many times (every 250 µs) the path looks again
// for a flow the kernel decided that the learner has not entered yet: the
// kernel sends its records in batches, at least every 10 ms (the daemon's
// NFLOG settings), so 25 ms covers a batch and the learner's work.
const learnerWaits = 100

// mayWait reports whether the worker may wait for the learner now: not
// within a second of a wait that found nothing, so that a flood of packets
// about flows no one decided (forged ICMP errors to an uplink's address)
// costs the queue one wait a second, not one each.
func (w *Worker) mayWait() bool { return time.Since(w.vainWait) >= time.Second }

// waitedInVain records a wait for the learner that found nothing.
func (w *Worker) waitedInVain() { w.vainWait = time.Now() }

// What an MSS leaves out of the MTU: the IP and TCP headers.
const (
	tcpIPv4Headers = 40
	tcpIPv6Headers = 60
)

// Handle gives one queued packet its verdict (or holds it until EndBatch).
func (w *Worker) Handle(p *queue.Packet) {
	var t rewrite.Packet
	if err := rewrite.Parse(p.Payload, &t); err != nil {
		var e rewrite.ICMPError
		if errors.Is(err, rewrite.ErrProtocol) && rewrite.ParseICMPError(p.Payload, &e) == nil {
			w.icmpError(p, &e)
			return
		}
		w.accept(p) // not ours to judge
		return
	}
	out := p.Hook == queue.HookLocalOut
	switch {
	case t.Proto == ipproto.TCP && t.Flags&(rewrite.SYN|rewrite.ACK|rewrite.FIN|rewrite.RST) == rewrite.SYN && out:
		w.s.Stats.SYNs.Add(1)
		w.s.Stats.Received.Add(1)
		w.syn(p, &t)
	case t.Proto != ipproto.TCP && out && (t.Proto == ipproto.UDP || t.Flags == rewrite.EchoRequest4 || t.Flags == rewrite.EchoRequest6):
		w.datagram(p, &t)
	case w.s.Userspace:
		w.forward(p, &t)
	default:
		w.accept(p)
	}
}

// forward translates one packet of a translated flow, the userspace
// datapath's job for every packet after the first: outbound from the
// socket's tuple to the wire's, with the flow's mark; inbound back.
func (w *Worker) forward(p *queue.Packet, t *rewrite.Packet) {
	d := w.s
	if p.Hook == queue.HookLocalOut {
		f := d.Install.Table().Get(flow.Key{Proto: t.Proto, Src: t.Src, Dst: t.Dst})
		if f == nil || f.Pass {
			w.accept(p) // its socket is gone; the selector follows
			return
		}
		d.Stats.Forwarded.Add(1)
		d.Stats.Bytes.Add(uint64(len(p.Payload)))
		rewrite.SetSource(p.Payload, t, f.NewSrc)
		rewrite.Checksum(p.Payload, t)
		w.verdicted(p.ID, w.q.AcceptModified(p.ID, f.Mark, p.Payload))
		return
	}
	f := d.Install.Table().ByWire(flow.Key{Proto: t.Proto, Src: t.Dst, Dst: t.Src})
	if f == nil || f.Pass {
		w.accept(p)
		return
	}
	d.Stats.Forwarded.Add(1)
	d.Stats.Bytes.Add(uint64(len(p.Payload)))
	rewrite.SetDestination(p.Payload, t, f.Src)
	rewrite.Checksum(p.Payload, t)
	w.verdicted(p.ID, w.q.AcceptPacket(p.ID, p.Payload))
}

// datagram decides the flow of an outbound UDP datagram or echo request
// whose tuple the kernel has no decision for, and caches the decision in
// the kernel: a translation, or a pass. Datagrams of a tuple already
// decided come here only while its elements are on their way (and with the
// userspace datapath, always): they follow the decision, in order, with no
// lookup. (A new socket on a tuple whose socket just closed is caught by
// the kernel's cached decision too, until the next sweep removes it.)
func (w *Worker) datagram(p *queue.Packet, t *rewrite.Packet) {
	d := w.s
	key := flow.Key{Proto: t.Proto, Src: t.Src, Dst: t.Dst}
	f := d.Install.Table().Get(key)
	if f == nil || !d.Userspace {
		d.Stats.Received.Add(1) // through the prefilter (not a userspace selector)
	}
	if f != nil {
		w.follow(p, t, f)
		return
	}
	start := time.Now()

	// 1. The socket, for UDP: its cookie tells this socket from a later
	// one on the tuple, and its end ends the flow. Ping sockets are not in
	// sock_diag: echo flows end by idleness alone, as do datagrams of a
	// socket that is gone already.
	var sock sockdiag.Socket
	if t.Proto == ipproto.UDP {
		var err error
		if sock, err = w.diag.Lookup(ipproto.UDP, t.Src, t.Dst); err != nil && !errors.Is(err, sockdiag.ErrNotFound) {
			d.Stats.Errors[ErrSocketLookup].Add(1)
			d.logf(slog.LevelError, "socket lookup", "proto", "udp", "src", t.Src, "dst", t.Dst, "err", err)
			if d.FailClosed {
				w.fail(p, t, FailSocketLookup)
				return
			}
		}
	}
	if sock.Cookie == 0 {
		sock.UID = p.UID // the queue reports the sending socket's owner
	}
	d.Stats.Datagrams.Add(1)

	// 2. The mark. Multicast, broadcast and link-local traffic stays on its
	// link: it is never translated.
	var mark uint32
	var ruleName string
	if dst := t.Dst.Addr(); !dst.IsMulticast() && !dst.IsLinkLocalUnicast() && dst != netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		// A local service's socket (unconnected, on a port of its own) may
		// be answering a client whose tuple the kernel could not learn
		// (see policy.DecideService).
		remote := sock.Remote.Addr()
		service := t.Proto == ipproto.UDP && sock.Cookie != 0 && (!remote.IsValid() || remote.IsUnspecified()) &&
			(t.Src.Port() < d.PortLo || t.Src.Port() > d.PortHi)
		if service {
			d.Stats.Service.Add(1)
		}
		var refuse bool
		mark, ruleName, refuse = w.decide(d.Config.Load(), &sock, p, t, service)
		if refuse {
			w.decided(ruleName, start)
			w.refuse(p, t, ruleName, nil)
			return
		}
	}
	w.decided(ruleName, start)

	// 3. The route, and the source it prefers.
	rt, ok := w.route(p, t, mark, sock.UID)
	if !ok {
		if w.s.FailClosed {
			w.fail(p, t, FailNoRoute)
			return
		}
		w.s.Stats.Failed[FailNoRoute].Add(1) // cached as a pass: counted once per flow
		rt, mark = route.Route{Src: t.Src.Addr(), DevIdx: int(p.OutDev)}, p.Mark
	}
	want := netip.AddrPortFrom(rt.Src, t.Src.Port())
	onWire := d.Install.Table().OnWire(flow.Key{Proto: t.Proto, Src: want, Dst: t.Dst})
	f = &flow.Flow{Key: key, Mark: mark, Rule: ruleName, UID: sock.UID, Cookie: sock.Cookie, Inode: sock.Inode,
		Start: time.Now(), Dev: rt.Dev}
	f.UsedAt = f.Start
	echo := t.Proto != ipproto.UDP
	if rt.Src == t.Src.Addr() && mark == p.Mark && !onWire {
		// Routing already gets it right: cache that, so the tuple's later
		// packets pass in the kernel.
		f.Pass, f.NewSrc = true, t.Src
		w.passed = true
		if !w.admitAs(f, want) {
			if d.debug() {
				d.Log.Debug("tuple already decided by another worker", "proto", t.Proto.String(), "src", t.Src, "dst", t.Dst)
			}
		} else if d.Events.On(events.Pass) {
			w.describeOwner(f)
			d.Events.Pass(f, passReason(ruleName, mark))
		}
		w.accept(p)
		return
	}
	if echo && onWire {
		// An echo keeps its identifier, and another flow has it on the wire
		// to the same peer: replies could not be told apart.
		d.logf(slog.LevelWarn, "echo identifier in use on the wire: cannot translate", "src", t.Src, "dst", t.Dst, "new_src", want)
		w.fail(p, t, FailEchoID)
		return
	}
	if f.Dev == "" {
		if li, err := w.routes.Link(rt.DevIdx); err == nil {
			f.Dev = li.Name
		}
	}
	w.describeOwner(f)
	if echo {
		ok = w.admitAs(f, want)
	} else {
		var err error
		if ok, err = w.admit(f, want, t.Dst, sock.Cookie, onWire); err != nil {
			w.lookupFailed(p, t, err)
			return
		}
	}
	if !ok {
		d.Stats.Errors[ErrNoPort].Add(1)
		d.Stats.Failed[FailNoPort].Add(1)
		d.logf(slog.LevelError, "no free source port for translation; dropping the datagram", "proto", t.Proto.String(), "src", t.Src, "dst", t.Dst, "new_src", rt.Src)
		w.drop(p)
		return
	}
	d.Stats.Translated.Add(1)
	d.Events.Flow("NEW", f)
	w.hold(p, t, f)
}

// follow sends a datagram of a decided flow the way its first went: as it
// is for a pass; translated for a translation, held behind the batch's
// transaction if its elements are not in yet (the ordering rule,
// flow.Installer), so it cannot overtake the first.
func (w *Worker) follow(p *queue.Packet, t *rewrite.Packet, f *flow.Flow) {
	switch {
	case f.Pass:
		w.accept(p)
	case !w.s.Install.Installed(f):
		w.hold(p, t, f)
	default:
		rewrite.SetSource(p.Payload, t, f.NewSrc)
		rewrite.Checksum(p.Payload, t)
		w.verdicted(p.ID, w.q.AcceptModified(p.ID, f.Mark, p.Payload))
	}
}

// syn decides a new connection and releases its SYN.
func (w *Worker) syn(p *queue.Packet, t *rewrite.Packet) {
	d := w.s
	start := time.Now()
	key := flow.Key{Proto: ipproto.TCP, Src: t.Src, Dst: t.Dst}

	// 1. The socket. Its cookie tells a retransmitted SYN from a new socket
	// that reuses the tuple; its existence is what later ends the flow.
	sock, err := w.diag.Lookup(ipproto.TCP, t.Src, t.Dst)
	if err != nil {
		if !errors.Is(err, sockdiag.ErrNotFound) {
			d.Stats.Errors[ErrSocketLookup].Add(1)
			d.logf(slog.LevelError, "socket lookup", "src", t.Src, "dst", t.Dst, "err", err)
			w.fail(p, t, FailSocketLookup)
			return
		}
		raw, err := w.owner.owners.HasRawSocket(t.Src.Addr().Is6(), p.UID)
		if err != nil {
			d.Stats.Errors[ErrSocketLookup].Add(1)
			d.logf(slog.LevelError, "raw socket lookup", "src", t.Src, "dst", t.Dst, "err", err)
		}
		if !raw || !p.HasUID {
			// The SYN of a TCP socket closed before the daemon looked:
			// nothing to translate, and a translation would outlive it
			// on its tuple, for the next socket there to inherit.
			w.fail(p, t, FailNoSocket)
			return
		}
		// No TCP socket, and its user has a raw socket: a raw socket's
		// SYN (traceroute -T, a SYN scan, hping3). It is decided as a
		// datagram is: by the rules that need no socket owner, and its
		// flow ends by idleness (Cookie 0).
		sock = sockdiag.Socket{UID: p.UID}
		d.Stats.RawSYNs.Add(1)
	}
	kernel := d.kernelDecides(p.Mark, t.Src.Addr().Is6())
	known := d.Install.Table().Get(key)
	// A SYN the kernel could have decided comes here when its tuple has
	// elements already: most often a retransmission of a flow the kernel
	// decided, whose record may still be on its way to the learner.
	for i := 0; known == nil && kernel && w.mayWait() && i < learnerWaits; i++ {
		time.Sleep(250 * time.Microsecond)
		if known = d.Install.Table().Get(key); known == nil && i == learnerWaits-1 {
			w.waitedInVain()
		}
	}
	if f := known; f != nil {
		if kernel {
			d.Stats.Exceptions[ExcKnownTuple].Add(1)
			kernel = false // counted
		}
		// A flow the kernel decided is followed by its tuple until the
		// sweeper learns its socket's cookie.
		if f.Cookie == sock.Cookie || (f.Kernel && f.Cookie == 0) {
			d.Stats.Retrans.Add(1)
			w.hold(p, t, f) // a retransmitted SYN: same translation
			return
		}
		// A new socket reuses a tuple whose old socket we have not yet
		// swept: the old translation must not leak onto it.
		d.Forget(f)
	}

	// 2. The mark: the host's own, else the first matching rule's.
	mark, ruleName, refuse := w.decide(d.Config.Load(), &sock, p, t, false)
	w.decided(ruleName, start)
	if refuse {
		w.refuse(p, t, ruleName, &sock)
		return
	}

	// 3. The route that mark leads to, and its preferred source.
	rt, ok := w.route(p, t, mark, sock.UID)
	if !ok {
		w.fail(p, t, FailNoRoute)
		return
	}
	want := netip.AddrPortFrom(rt.Src, t.Src.Port())
	onWire := d.Install.Table().OnWire(flow.Key{Proto: ipproto.TCP, Src: want, Dst: t.Dst})
	// A SYN already on an address the kernel gives host-marked flows
	// comes here only when the kernel found its tuple a translation's:
	// one the daemon may not have learned yet (its record is on its way).
	for i := 0; !onWire && i < learnerWaits && rt.Src == t.Src.Addr() && d.kernelAddr(rt.Src) && w.mayWait(); i++ {
		time.Sleep(250 * time.Microsecond)
		if onWire = d.Install.Table().OnWire(flow.Key{Proto: ipproto.TCP, Src: want, Dst: t.Dst}); !onWire && i == learnerWaits-1 {
			w.waitedInVain()
		}
	}
	if rt.Src == t.Src.Addr() && mark == p.Mark && !onWire {
		w.accept(p) // routing already gets it right: costs nothing from now on
		if d.Events.On(events.Pass) {
			f := flow.Flow{Key: key, Mark: mark, Rule: ruleName, UID: sock.UID, NewSrc: t.Src}
			w.describeOwner(&f)
			d.Events.Pass(&f, passReason(ruleName, mark))
		}
		return
	}

	if kernel {
		if onWire || mark != p.Mark {
			d.Stats.Exceptions[ExcWireTaken].Add(1)
		} else {
			d.Stats.Exceptions[ExcOther].Add(1)
		}
	}

	// 4. The flow.
	f := &flow.Flow{Key: key, Mark: mark, Rule: ruleName, UID: sock.UID, Cookie: sock.Cookie, Inode: sock.Inode,
		Start: time.Now(), Dev: rt.Dev}
	f.UsedAt = f.Start // a raw socket's flow ends this long after its first SYN (its packets are not counted)
	headers := tcpIPv4Headers
	if t.Src.Addr().Is6() {
		headers = tcpIPv6Headers
	}
	if rt.MTU > headers {
		f.MSS = uint16(min(rt.MTU-headers, 0xffff))
	}
	if f.Dev == "" {
		if li, err := w.routes.Link(rt.DevIdx); err == nil {
			f.Dev = li.Name
		}
	}
	w.describeOwner(f)

	// 5. A source port: the socket's own unless that tuple is taken on the
	// wire by a real socket or another translation. The flow table takes
	// it atomically, and its kernel elements are queued, in table order.
	ok, err = w.admit(f, want, t.Dst, sock.Cookie, onWire)
	if err != nil {
		w.lookupFailed(p, t, err)
		return
	}
	if !ok {
		d.Stats.Errors[ErrNoPort].Add(1)
		d.Stats.Failed[FailNoPort].Add(1)
		d.logf(slog.LevelError, "no free source port for translation; dropping SYN (the socket will retry)", "src", t.Src, "dst", t.Dst, "new_src", rt.Src)
		w.drop(p)
		return
	}
	d.Stats.Translated.Add(1)
	d.Events.Flow("NEW", f)

	// 6. The SYN itself, rewritten, goes out once its elements are in.
	w.hold(p, t, f)
}

// decided records one decision. Each worker keeps its own counter per rule
// name, so the packet path neither locks nor allocates after the first
// decision by a rule.
func (w *Worker) decided(rule string, start time.Time) {
	w.s.Latency.Observe(time.Since(start).Seconds())
	if rule == "" {
		rule = "none"
	}
	c, ok := w.ruleCounters[rule]
	if !ok {
		if w.ruleCounters == nil {
			w.ruleCounters = map[string]prometheus.Counter{}
		}
		c = w.s.Decisions.WithLabelValues(rule)
		w.ruleCounters[rule] = c
	}
	c.Inc()
}

// passReason says why a new flow needs no translation: its socket's source
// already is the one its route prefers.
func passReason(rule string, mark uint32) string {
	switch {
	case rule == "":
		return "no rule matched"
	case mark == 0:
		return "decided for the host's own routing, which already uses the socket's source"
	}
	return "the socket's source already is the uplink's address"
}

// route returns the route a new flow's mark leads to, and its preferred
// source: the packet's own for mark 0. A marked flow with no route is left
// untranslated (false).
func (w *Worker) route(p *queue.Packet, t *rewrite.Packet, mark, uid uint32) (route.Route, bool) {
	if mark == 0 && p.Mark == 0 {
		return route.Route{Src: t.Src.Addr(), DevIdx: int(p.OutDev)}, true
	}
	// (A host-marked flow moved to the host's routing, its uplink being
	// down, asks it too: its socket's source was chosen for the mark.)
	rt, err := w.routes.Lookup(t.Dst.Addr(), mark, uid, true)
	if err != nil {
		w.s.Stats.Errors[ErrNoRoute].Add(1)
		w.s.logf(slog.LevelWarn, "no route for marked flow", "proto", t.Proto.String(), "src", t.Src, "dst", t.Dst, "mark", mark, "err", err)
		return route.Route{}, false
	}
	return rt, true
}

// icmpError readdresses an ICMP error about a translated flow to its socket:
// the error was sent to the wire's source and quotes the wire's tuple, and
// the socket (path MTU discovery above all) only recognises its own.
func (w *Worker) icmpError(p *queue.Packet, e *rewrite.ICMPError) {
	wire := flow.Key{Proto: e.InnerProto, Src: e.Src, Dst: e.To}
	f := w.s.Install.Table().ByWire(wire)
	// A flow the kernel decided may not be learned yet (its record is on
	// its way): an error to a kernel-decided source waits for it a little.
	for i := 0; f == nil && i < learnerWaits && w.s.kernelAddr(e.Dst) && w.mayWait(); i++ {
		time.Sleep(250 * time.Microsecond)
		if f = w.s.Install.Table().ByWire(wire); f == nil && i == learnerWaits-1 {
			w.waitedInVain()
		}
	}
	if f == nil || f.Pass || e.Dst != f.NewSrc.Addr() {
		w.accept(p) // not about a translated flow
		return
	}
	rewrite.TranslateICMPError(p.Payload, e, f.Src)
	w.s.Stats.ICMPErrors.Add(1)
	if w.s.debug() {
		w.s.Log.Debug("icmp error readdressed", "type", e.Type, "code", e.Code, "proto", f.Proto.String(), "wire", f.NewSrc, "socket", f.Src, "dst", f.Dst)
	}
	w.verdicted(p.ID, w.q.AcceptPacket(p.ID, p.Payload))
}

// decide returns the mark a new flow must carry and what decided it: the
// mark the host's own rules set (with honor_marks), else the first matching
// rule's; mark 0 means the normal route. The owner (process, cgroup) is
// looked up only if a rule needs it. For a local service's datagram only
// rules that name the socket's owner apply.
//
// An uplink that is down is not chosen: a rule takes the first of its
// uplinks that is up, else the host's routing or, with on_down = "drop",
// refuses the flow (refuse); a host mark for a down uplink goes to its
// fallback. A flow decided so keeps that path for its life: its mark is
// pinned in its element, even when its packets carry the host's mark.
func (w *Worker) decide(cfg *policy.Config, sock *sockdiag.Socket, p *queue.Packet, t *rewrite.Packet, service bool) (mark uint32, rule string, refuse bool) {
	w.owner.reset(sock)
	v6 := t.Dst.Addr().Is6()
	if cfg.Daemon.HonorMarks && p.Mark != 0 {
		u := cfg.UplinkByMark(p.Mark)
		if u == nil || w.s.Uplinks.Up(u.Mark, v6) {
			return p.Mark, "host mark", false
		}
		if f := u.Fallback; f != nil && w.s.Uplinks.Up(f.Mark, v6) {
			return f.Mark, "host mark, fallback", false
		}
		return 0, "host mark, fallback", false
	}
	w.query = policy.Flow{Proto: t.Proto, Dst: t.Dst, UID: sock.UID, GID: p.GID, HasUID: sock.Cookie != 0 || p.HasUID, Owner: &w.owner}
	var r *policy.Rule
	if service {
		r = cfg.DecideService(&w.query)
	} else {
		r = cfg.Decide(&w.query)
	}
	switch {
	case r == nil:
		return 0, "", false
	case r.Action.Kind == policy.ActDefault: // pinned to the normal route
		return 0, r.Name, false
	case r.Action.Kind == policy.ActMark:
		return r.Action.Mark, r.Name, false
	}
	if r.Action.Kind == policy.ActBalance {
		if m, ok := w.s.Balance.Pick(w.s.Uplinks, r, sock.UID, t.Dst.Addr(), v6); ok {
			return m, r.Name, false
		}
		return 0, r.Name, r.Action.DropWhenDown
	}
	for _, c := range r.Action.Choices {
		if c.Uplink == nil {
			return 0, r.Name, false // "default"
		}
		if w.s.Uplinks.Up(c.Uplink.Mark, v6) {
			return c.Uplink.Mark, r.Name, false
		}
	}
	return 0, r.Name, r.Action.DropWhenDown
}

// refuse drops the first packet of a flow whose rule's uplinks are all
// down and that says on_down = "drop". A TCP socket is closed at once
// (SOCK_DESTROY), so that connect() fails instead of retrying for minutes.
func (w *Worker) refuse(p *queue.Packet, t *rewrite.Packet, rule string, sock *sockdiag.Socket) {
	d := w.s
	d.Stats.Refused.Add(1)
	if sock != nil && sock.Cookie != 0 {
		if err := w.diag.Destroy(ipproto.TCP, t.Src, t.Dst, sock.Cookie); err != nil && !errors.Is(err, sockdiag.ErrNotFound) {
			d.Stats.Errors[ErrSocketLookup].Add(1)
			d.Log.Error("refuse a connection: close its socket", "src", t.Src, "dst", t.Dst, "err", err)
		}
	}
	if d.debug() {
		d.Log.Debug("refused: every uplink of the rule is down (on_down = \"drop\")", "proto", t.Proto.String(), "src", t.Src, "dst", t.Dst, "rule", rule)
	}
	d.Events.Refused(t, rule)
	w.drop(p)
}

// describeOwner records on f the owner the decision looked up, and with
// --debug also what it did not need, for the event line.
func (w *Worker) describeOwner(f *flow.Flow) {
	o := &w.owner
	var fo flow.Owner
	debug := w.s.Events.On(events.New | events.Pass)
	if debug || o.procDone {
		if p, ok := o.Process(); ok {
			fo.Process = p
		}
	}
	if debug || o.cgDone {
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
// else the same address with a random port from the ephemeral range. It
// fails (false, nil) when no port it tried was free, and with the error
// when sock_diag cannot say whether one is.
func (w *Worker) admit(f *flow.Flow, want, dst netip.AddrPort, cookie uint64, taken bool) (bool, error) {
	d := w.s
	span := uint32(d.PortHi-d.PortLo) + 1
	for try := 0; try < 64; try++ {
		c := want
		if taken || try > 0 {
			c = netip.AddrPortFrom(want.Addr(), d.PortLo+uint16(rand.Uint32N(span)))
		}
		free, err := w.noOtherSocket(f.Proto, c, dst, cookie)
		if err != nil {
			return false, err
		}
		if free && w.admitAs(f, c) {
			return true, nil
		}
	}
	return false, nil
}

// admitAs adds f to the table with wire source src, and its elements to the
// kernel's queue of changes, unless the socket tuple or the wire tuple is
// taken.
func (w *Worker) admitAs(f *flow.Flow, src netip.AddrPort) bool { return w.s.Install.Add(f, src) }

// noOtherSocket reports whether no socket but the flow's own uses src→dst
// (for UDP: would receive datagrams from dst at src).
func (w *Worker) noOtherSocket(proto ipproto.Proto, src, dst netip.AddrPort, cookie uint64) (bool, error) {
	s, err := w.diag.Lookup(proto, src, dst)
	switch {
	case errors.Is(err, sockdiag.ErrNotFound):
		return true, nil
	case err != nil:
		return false, err
	}
	return s.Cookie == cookie, nil
}

// lookupFailed handles a first packet whose wire tuple could not be
// checked: sock_diag failed. A translation onto a tuple another socket
// uses would take its replies, so the flow is not translated: it fails as
// the policy's on_failure says.
func (w *Worker) lookupFailed(p *queue.Packet, t *rewrite.Packet, err error) {
	w.s.Stats.Errors[ErrSocketLookup].Add(1)
	w.s.logf(slog.LevelError, "socket lookup: is the new source port free?", "proto", t.Proto.String(), "src", t.Src, "dst", t.Dst, "err", err)
	w.fail(p, t, FailSocketLookup)
}

// hold rewrites a flow's first packet (a SYN: with its MSS clamped) and
// keeps it until the batch's elements are installed (see EndBatch; the
// ordering rule, flow.Installer).
func (w *Worker) hold(p *queue.Packet, t *rewrite.Packet, f *flow.Flow) {
	rewrite.SetSource(p.Payload, t, f.NewSrc)
	if f.MSS != 0 {
		rewrite.ClampMSS(p.Payload, t, f.MSS)
	}
	rewrite.Checksum(p.Payload, t)
	if w.nheld == maxHeld { // rare: more first packets than a batch holds
		w.s.Install.Flush()
		w.release(p.ID, f, p.Payload)
		return
	}
	w.held[w.nheld] = heldPacket{id: p.ID, f: f, pkt: p.Payload}
	w.nheld++
}

// EndBatch runs before the queue sends its batch of verdicts: install the
// batch's elements in one transaction (the passes' too), then release its
// held packets, in the order they came (the ordering rule, flow.Installer).
func (w *Worker) EndBatch() {
	if w.nheld == 0 && !w.passed {
		return
	}
	w.passed = false
	w.s.Install.Flush()
	for i := 0; i < w.nheld; i++ {
		h := &w.held[i]
		w.release(h.id, h.f, h.pkt)
		*h = heldPacket{}
	}
	w.nheld = 0
}

// release lets a rewritten packet go with its flow's mark; the kernel routes
// it again because its source and mark changed. A flow whose elements could
// not be installed has left the table: its packet is dropped (the socket
// retransmits a SYN; a lost datagram is UDP's to handle).
func (w *Worker) release(id uint32, f *flow.Flow, pkt []byte) {
	if w.s.Install.Table().Get(f.Key) != f {
		w.dropID(id)
		return
	}
	w.verdicted(id, w.q.AcceptModified(id, f.Mark, pkt))
}

// verdicted counts and logs a verdict the kernel did not take: the packet
// stays queued until the queue is unbound.
func (w *Worker) verdicted(id uint32, err error) {
	if err != nil {
		w.s.Stats.Errors[ErrVerdict].Add(1)
		w.s.logf(slog.LevelError, "verdict", "id", id, "err", err)
	}
}

func (w *Worker) accept(p *queue.Packet) {
	w.verdicted(p.ID, w.q.Accept(p.ID))
}

func (w *Worker) drop(p *queue.Packet) { w.dropID(p.ID) }

func (w *Worker) dropID(id uint32) {
	w.s.Stats.Dropped.Add(1)
	w.verdicted(id, w.q.Drop(id))
}

// Why a flow the policy concerns could not be handled as it says.
type FailReason int

const (
	FailNoSocket     FailReason = iota // a SYN whose socket closed before the daemon looked
	FailSocketLookup                   // sock_diag failed
	FailNoRoute                        // the mark's route does not exist
	FailNoPort                         // no free source port (always dropped)
	FailEchoID                         // an echo's identifier is on the wire already, to the same peer
	FailReasons
)

var FailReasonNames = [FailReasons]string{"no_socket", "socket_lookup", "no_route", "no_free_port", "echo_id_in_use"}

// fail handles a first packet whose flow cannot be decided as the policy
// says: with on_failure = "open" it leaves as the host's routing sends it,
// with "closed" it is dropped (the socket retries). Either way it is
// counted and logged.
func (w *Worker) fail(p *queue.Packet, t *rewrite.Packet, reason FailReason) {
	d := w.s
	d.Stats.Failed[reason].Add(1)
	if d.FailClosed {
		d.logf(slog.LevelWarn, "cannot decide a new flow; dropped (on_failure = \"closed\")", "proto", t.Proto.String(), "src", t.Src, "dst", t.Dst,
			"mark", p.Mark, "reason", FailReasonNames[reason])
		w.drop(p)
		return
	}
	if d.debug() {
		d.Log.Debug("cannot decide a new flow; it leaves untranslated (on_failure = \"open\")", "proto", t.Proto.String(), "src", t.Src, "dst", t.Dst,
			"mark", p.Mark, "reason", FailReasonNames[reason])
	}
	if d.Events.On(events.Pass) {
		d.Events.Pass(&flow.Flow{Key: flow.Key{Proto: t.Proto, Src: t.Src, Dst: t.Dst}, Mark: p.Mark, UID: p.UID},
			"failed open: "+FailReasonNames[reason])
	}
	w.accept(p)
}
