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

// The packet path. The kernel queues every locally originated TCP SYN (the
// output chain's queue rule) and nothing else; all later packets of a
// translated flow are rewritten in the kernel by the map elements installed
// here. handle runs on the queue goroutine, gives every packet exactly one
// verdict, and fails open: whatever goes wrong, the packet leaves as the
// host's own routing would have sent it, or is dropped for the socket to
// retransmit when dropping is the only way to avoid a wrong translation.

// tcpIPHeaders is what an MSS leaves out of the MTU: IPv4 and TCP headers.
const tcpIPHeaders = 40

func (d *Daemon) handle(p *queue.Packet) {
	var t rewrite.TCP
	if err := rewrite.ParseTCP(p.Payload, &t); err != nil || t.Flags&(rewrite.SYN|rewrite.ACK) != rewrite.SYN {
		d.accept(p) // not the start of a TCP connection: not ours to judge
		return
	}
	key := flow.Key{Proto: unix.IPPROTO_TCP, Src: t.Src, Dst: t.Dst}

	// 1. The socket. Its cookie tells a retransmitted SYN from a new socket
	// that reuses the tuple; its existence is what later ends the flow.
	var sock sockdiag.Socket
	if err := d.diag.Lookup(unix.IPPROTO_TCP, t.Src, t.Dst, &sock); err != nil {
		if !errors.Is(err, sockdiag.ErrNotFound) {
			d.log.Error("socket lookup", "src", t.Src, "dst", t.Dst, "err", err)
		}
		// No socket (a raw socket's SYN, or one closed already): nothing
		// could tell us when the flow ends, so it is not translated.
		d.accept(p)
		return
	}

	cfg := d.cfg.Load()
	d.mu.Lock()
	defer d.mu.Unlock()
	if f := d.flows.Get(key); f != nil {
		if f.Cookie == sock.Cookie {
			d.release(p, &t, f) // a retransmitted SYN: same translation
			return
		}
		// A new socket reuses a tuple whose old socket we have not yet
		// swept: the old translation must not leak onto it.
		if d.flows.Remove(f) {
			d.removeKernel([]*flow.Flow{f})
			d.events.write("DESTROY", f)
		}
	}

	// 2. The mark: the host's own, else the first matching rule's.
	mark, ruleName := d.decide(cfg, &sock, p.Mark, p.GID, t.Dst)

	// 3. The route that mark leads to, and its preferred source.
	rt := route{Src: t.Src.Addr(), DevIdx: int(p.OutDev)}
	if mark != 0 {
		var err error
		if rt, err = d.routes.lookup(t.Dst.Addr(), mark, p.UID, p.HasUID); err != nil {
			d.log.Warn("no route for marked flow; leaving it untranslated", "src", t.Src, "dst", t.Dst, "mark", mark, "err", err)
			d.accept(p)
			return
		}
	}
	want := netip.AddrPortFrom(rt.Src, t.Src.Port())
	onWire := d.flows.OnWire(flow.Key{Proto: unix.IPPROTO_TCP, Src: want, Dst: t.Dst})
	if rt.Src == t.Src.Addr() && mark == p.Mark && !onWire {
		d.accept(p) // routing already gets it right: costs nothing from now on
		return
	}

	// 4. A source port: the socket's own unless that tuple is taken on the
	// wire by a real socket or another translation.
	newSrc, ok := d.pickSource(want, t.Dst, sock.Cookie, onWire)
	if !ok {
		d.log.Error("no free source port for translation; dropping SYN (the socket will retry)", "src", t.Src, "dst", t.Dst, "new_src", rt.Src)
		d.drop(p)
		return
	}

	// 5. Kernel entries first, so the SYN-ACK and every later packet are
	// translated; then the SYN itself.
	f := &flow.Flow{Key: key, NewSrc: newSrc, Mark: mark, Rule: ruleName, UID: sock.UID,
		Cookie: sock.Cookie, Inode: sock.Inode, Start: time.Now()}
	f.Dev = rt.Dev
	d.describeOwner(f)
	if rt.MTU > tcpIPHeaders {
		f.MSS = uint16(min(rt.MTU-tcpIPHeaders, 0xffff))
	}
	if f.Dev == "" {
		if li, err := d.routes.link(rt.DevIdx); err == nil {
			f.Dev = li.name
		}
	}
	if err := d.dp.Add(entry(f)); err != nil {
		d.log.Error("install flow in kernel; dropping SYN (the socket will retry)", "src", t.Src, "dst", t.Dst, "err", err)
		d.drop(p)
		return
	}
	d.flows.Insert(f)
	d.events.write("NEW", f)
	d.release(p, &t, f)
}

// decide returns the mark a new connection must carry and what decided it:
// the mark the host's own rules set (with honor_marks), else the first
// matching rule's; mark 0 means the normal route. The owner (process,
// cgroup) is looked up only if a rule needs it.
func (d *Daemon) decide(cfg *policy.Config, sock *sockdiag.Socket, pktMark, gid uint32, dst netip.AddrPort) (uint32, string) {
	d.owner.reset(sock)
	if cfg.Daemon.HonorMarks && pktMark != 0 {
		return pktMark, "host mark"
	}
	d.query = policy.Flow{Protocol: "tcp", Dst: dst, UID: sock.UID, GID: gid, HasUID: true, Owner: &d.owner}
	r := cfg.Decide(&d.query)
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
func (d *Daemon) describeOwner(f *flow.Flow) {
	o := &d.owner
	if d.events != nil || o.procDone {
		if p, ok := o.Process(); ok {
			f.PID, f.Comm, f.Exe = p.PID, p.Comm, p.Exe
		}
	}
	if d.events != nil || o.cgDone {
		if cg, ok := o.Cgroup(); ok {
			f.Cgroup = "/" + cg
		}
	}
}

// release rewrites a flow's SYN and lets it go with the flow's mark; the
// kernel routes it again because its source and mark changed.
func (d *Daemon) release(p *queue.Packet, t *rewrite.TCP, f *flow.Flow) {
	rewrite.SetSource(p.Payload, t, f.NewSrc)
	if f.MSS != 0 {
		rewrite.ClampMSS(p.Payload, t, f.MSS)
	}
	rewrite.Checksum(p.Payload, t)
	if err := d.q.AcceptModified(p.ID, f.Mark, p.Payload); err != nil {
		d.log.Error("verdict", "id", p.ID, "err", err)
	}
}

// pickSource returns want if its tuple to dst is free on the wire, else the
// same address with a random free port from the ephemeral range.
func (d *Daemon) pickSource(want, dst netip.AddrPort, cookie uint64, taken bool) (netip.AddrPort, bool) {
	if !taken && d.free(want, dst, cookie) {
		return want, true
	}
	span := uint32(d.portHi-d.portLo) + 1
	for range 64 {
		c := netip.AddrPortFrom(want.Addr(), d.portLo+uint16(rand.Uint32N(span)))
		if d.free(c, dst, cookie) {
			return c, true
		}
	}
	return netip.AddrPort{}, false
}

// free reports whether no translation and no other socket uses src→dst.
func (d *Daemon) free(src, dst netip.AddrPort, cookie uint64) bool {
	if d.flows.OnWire(flow.Key{Proto: unix.IPPROTO_TCP, Src: src, Dst: dst}) {
		return false
	}
	var s sockdiag.Socket
	err := d.diag.Lookup(unix.IPPROTO_TCP, src, dst, &s)
	if errors.Is(err, sockdiag.ErrNotFound) {
		return true
	}
	return err == nil && s.Cookie == cookie // the flow's own socket
}

func (d *Daemon) accept(p *queue.Packet) {
	if err := d.q.Accept(p.ID); err != nil {
		d.log.Error("verdict", "id", p.ID, "err", err)
	}
}

func (d *Daemon) drop(p *queue.Packet) {
	if err := d.q.Drop(p.ID); err != nil {
		d.log.Error("verdict", "id", p.ID, "err", err)
	}
}
