// Package events is the daemon's debug stream (--debug): one line per flow
// event, in the spirit of conntrack -E.
package events

import (
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/rerouted/rerouted/internal/connect"
	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/rewrite"
	"github.com/rerouted/rerouted/internal/uplink"
)

// A Writer prints one line per flow event, in the spirit of conntrack -E:
//
//	[NEW] tcp src=198.51.100.2 dst=192.0.2.80 sport=40312 dport=80 mark=100 => src=203.0.113.2 sport=40312 dev=hb uid=1000 pid=4242 comm="curl" exe=/usr/bin/curl cgroup=/user.slice/user-1000.slice/session-1.scope rule="web"
//
// pid, comm and exe appear when the owning process is known, cgroup when
// the socket's cgroup is.
//
//	[DESTROY] tcp src=... (the same) age=3.2s
//
// UDP lines are alike; an echo shows its identifier instead of ports:
//
//	[NEW] icmp src=198.51.100.2 dst=192.0.2.80 id=4242 mark=100 => src=203.0.113.2 dev=hb uid=0 rule="host mark"
//
// A flow the daemon decided to leave alone gets one line, with why:
//
//	[PASS] tcp src=198.51.100.2 dst=192.0.2.80 sport=40314 dport=8081 mark=0 uid=1000 pid=4243 comm="curl" exe=/usr/bin/curl rule="" reason="no rule matched"
//
// A nil *Writer prints nothing; kinds selects what a non-nil one prints.
// It is safe for concurrent use.
type Writer struct {
	kinds Kinds
	mu    sync.Mutex
	w     io.Writer
	buf   []byte
}

// NewWriter returns a Writer of the lines of kinds to w.
func NewWriter(w io.Writer, kinds Kinds) *Writer { return &Writer{w: w, kinds: kinds} }

// Kinds selects the lines of the debug stream (--debug=new,pass,...).
type Kinds uint16

// The kinds of debug-stream line.
const (
	New     Kinds = 1 << iota // [NEW] and [ADOPT]: a flow translated, or adopted at start
	Destroy                   // [DESTROY]: a translation ended
	Pass                      // [PASS]: a new flow left alone, and why
	Move                      // [MOVE]: a flow moved off an address that went away
	Refused                   // [REFUSED]: a flow refused, its rule's uplinks all down
	Uplink                    // [UPLINK]: an uplink went down or came up
	Log                       // the daemon's DEBUG log lines
	Bind                      // [BIND]: a socket bound to its uplink at connect() (steering = "connect")
	All     = New | Destroy | Pass | Move | Refused | Uplink | Log | Bind
)

var eventKindNames = []struct {
	name string
	kind Kinds
}{{"new", New}, {"destroy", Destroy}, {"pass", Pass}, {"move", Move},
	{"refused", Refused}, {"uplink", Uplink}, {"log", Log}, {"bind", Bind}}

// ParseKinds reads a comma-separated list of event kinds ("new,pass");
// "all" or "true" is every kind.
func ParseKinds(s string) (Kinds, error) {
	var k Kinds
	for _, name := range strings.Split(s, ",") {
		name = strings.TrimSpace(name)
		if name == "all" || name == "true" {
			k |= All
			continue
		}
		found := false
		for _, n := range eventKindNames {
			if n.name == name {
				k |= n.kind
				found = true
			}
		}
		if !found {
			var names []string
			for _, n := range eventKindNames {
				names = append(names, n.name)
			}
			return 0, fmt.Errorf("unknown debug event kind %q (known: %s, all)", name, strings.Join(names, ", "))
		}
	}
	return k, nil
}

// On reports whether lines of kind k are printed.
func (e *Writer) On(k Kinds) bool { return e != nil && e.kinds&k != 0 }

// Flow prints a flow translated ("NEW"), adopted at start ("ADOPT") or
// ended ("DESTROY").
func (e *Writer) Flow(kind string, f *flow.Flow) {
	k := New
	if kind == "DESTROY" {
		k = Destroy
	}
	if !e.On(k) {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	b := append(e.buf[:0], '[')
	b = append(b, kind...)
	b = append(b, "] "...)
	b = appendFlow(b, f)
	if kind == "DESTROY" {
		b = append(b, " age="...)
		b = append(b, time.Since(f.Start).Round(100*time.Millisecond).String()...)
	}
	b = append(b, '\n')
	e.buf = b
	e.w.Write(b)
}

// Pass prints a new flow the daemon leaves alone, once (a flow whose
// decision the kernel caches, or a connection's SYN), with why. f holds
// the socket's tuple, the mark the packet keeps, the owner as far as known
// and the rule that matched, if any.
func (e *Writer) Pass(f *flow.Flow, reason string) {
	if !e.On(Pass) {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	b := append(e.buf[:0], "[PASS] "...)
	b = appendTuple(b, f)
	b = appendOwner(b, f)
	b = append(b, " reason="...)
	b = strconv.AppendQuote(b, reason)
	b = append(b, '\n')
	e.buf = b
	e.w.Write(b)
}

// appendFlow formats the part of a flow line shared by events and listings.
func appendFlow(b []byte, f *flow.Flow) []byte {
	b = appendTuple(b, f)
	b = append(b, " => src="...)
	b = f.NewSrc.Addr().AppendTo(b)
	if !f.Proto.IsICMP() {
		b = append(b, " sport="...)
		b = strconv.AppendUint(b, uint64(f.NewSrc.Port()), 10)
	}
	b = append(b, " dev="...)
	b = append(b, f.Dev...)
	b = appendOwner(b, f)
	switch {
	case f.Kernel:
		b = append(b, " decided_by=kernel"...) // a host mark, decided by the table's rules
	case f.Proto == ipproto.TCP && f.Cookie == 0:
		b = append(b, " socket=none ends=idle"...) // a raw socket's SYN
	}
	return b
}

// appendTuple formats a flow's socket tuple and mark.
func appendTuple(b []byte, f *flow.Flow) []byte {
	b = append(b, f.Proto.String()...)
	b = append(b, " src="...)
	b = f.Src.Addr().AppendTo(b)
	b = append(b, " dst="...)
	b = f.Dst.Addr().AppendTo(b)
	echo := f.Proto.IsICMP()
	if echo { // the identifier, as conntrack shows it
		b = append(b, " id="...)
		b = strconv.AppendUint(b, uint64(f.Src.Port()), 10)
	} else {
		b = append(b, " sport="...)
		b = strconv.AppendUint(b, uint64(f.Src.Port()), 10)
		b = append(b, " dport="...)
		b = strconv.AppendUint(b, uint64(f.Dst.Port()), 10)
	}
	b = append(b, " mark="...)
	return strconv.AppendUint(b, uint64(f.Mark), 10)
}

// appendOwner formats a flow's owner, as far as known, and its rule.
func appendOwner(b []byte, f *flow.Flow) []byte {
	b = append(b, " uid="...)
	b = strconv.AppendUint(b, uint64(f.UID), 10)
	if o := f.Owner; o != nil && o.PID != 0 {
		b = append(b, " pid="...)
		b = strconv.AppendInt(b, int64(o.PID), 10)
		b = append(b, " comm="...)
		b = strconv.AppendQuote(b, o.Comm)
		b = append(b, " exe="...)
		b = append(b, o.Exe...)
	}
	if o := f.Owner; o != nil && o.Cgroup != "" {
		b = append(b, " cgroup="...)
		b = append(b, o.Cgroup...)
	}
	b = append(b, " rule="...)
	return strconv.AppendQuote(b, f.Rule)
}

// Move prints a flow moved off an address that went away:
//
//	[MOVE] udp src=198.51.100.2 dst=192.0.2.80 sport=5000 dport=53 mark=100 => src=203.0.113.2 ... how=redecided next_src=203.0.113.3
func (e *Writer) Move(f *flow.Flow, how string, next netip.Addr) {
	if !e.On(Move) {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	b := append(e.buf[:0], "[MOVE] "...)
	b = appendFlow(b, f)
	b = append(b, " how="...)
	b = append(b, how...)
	if next.IsValid() {
		b = append(b, " next_src="...)
		b = next.AppendTo(b)
	}
	b = append(b, '\n')
	e.buf = b
	e.w.Write(b)
}

// Refused prints a flow refused because its rule's uplinks are down:
//
//	[REFUSED] tcp src=198.51.100.2 dst=192.0.2.80 sport=40312 dport=80 rule="web": every uplink of the rule is down
func (e *Writer) Refused(t *rewrite.Packet, rule string) {
	if !e.On(Refused) {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	b := append(e.buf[:0], "[REFUSED] "...)
	b = append(b, t.Proto.String()...)
	b = append(b, " src="...)
	b = t.Src.Addr().AppendTo(b)
	b = append(b, " dst="...)
	b = t.Dst.Addr().AppendTo(b)
	b = append(b, " sport="...)
	b = strconv.AppendUint(b, uint64(t.Src.Port()), 10)
	b = append(b, " dport="...)
	b = strconv.AppendUint(b, uint64(t.Dst.Port()), 10)
	b = append(b, " rule="...)
	b = strconv.AppendQuote(b, rule)
	b = append(b, ": every uplink of the rule is down\n"...)
	e.buf = b
	e.w.Write(b)
}

// Bind prints a socket the connect-time program bound to its uplink, or a
// connect() it refused:
//
//	[BIND] tcp dst=192.0.2.80 dport=8080 => src=203.0.113.2 uplink=isp-b uid=1000 pid=4242 comm="curl" rule="web"
//	[REFUSED] tcp dst=192.0.2.80 dport=8080 uid=1000 pid=4242 comm="curl" rule="api": every uplink of the rule is down (at connect)
func (e *Writer) Bind(ev connect.Event, rule, up string, src netip.Addr) {
	k := Bind
	if ev.Refused {
		k = Refused
	}
	if !e.On(k) {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	b := append(e.buf[:0], "[BIND] "...)
	if ev.Refused {
		b = append(e.buf[:0], "[REFUSED] "...)
	}
	b = append(b, ev.Proto.String()...)
	b = append(b, " dst="...)
	b = ev.Dst.Addr().AppendTo(b)
	b = append(b, " dport="...)
	b = strconv.AppendUint(b, uint64(ev.Dst.Port()), 10)
	if !ev.Refused {
		b = append(b, " => src="...)
		b = src.AppendTo(b)
		b = append(b, " uplink="...)
		b = append(b, up...)
	}
	b = append(b, " uid="...)
	b = strconv.AppendUint(b, uint64(ev.UID), 10)
	b = append(b, " pid="...)
	b = strconv.AppendUint(b, uint64(ev.PID), 10)
	b = append(b, " comm="...)
	b = strconv.AppendQuote(b, ev.Comm)
	b = append(b, " rule="...)
	b = strconv.AppendQuote(b, rule)
	if ev.Refused {
		b = append(b, ": every uplink of the rule is down (at connect)"...)
	}
	b = append(b, '\n')
	e.buf = b
	e.w.Write(b)
}

// Uplink prints an uplink's transition:
//
//	[UPLINK] isp-b ipv4 down: link hb is down
func (e *Writer) Uplink(st uplink.Status) {
	if !e.On(Uplink) {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	b := append(e.buf[:0], "[UPLINK] "...)
	b = append(b, st.Uplink...)
	b = append(b, ' ')
	b = append(b, st.Family...)
	if st.Up {
		b = append(b, " up"...)
	} else {
		b = append(b, " down: "...)
		b = append(b, st.Why...)
	}
	b = append(b, '\n')
	e.buf = b
	e.w.Write(b)
}
