package packet

import "sync/atomic"

// Stats counts what the packet path did, for the logs and the metrics.
// The daemon's other goroutines count their own errors and ends of flows
// (the daemon's counts); they add here only to the packet path's kinds
// they share (a socket lookup, a kernel decision learned).
type Stats struct {
	SYNs       atomic.Uint64              // SYNs decided
	Datagrams  atomic.Uint64              // UDP and echo flows decided
	Translated atomic.Uint64              // new flows translated
	Retrans    atomic.Uint64              // retransmitted SYNs of translated flows
	RawSYNs    atomic.Uint64              // SYNs no TCP socket owns (raw sockets): decided without an owner
	TCPClosed  atomic.Uint64              // TCP flows ended as the kernel announced their socket's end
	Dropped    atomic.Uint64              // packets dropped (the socket retries)
	Refused    atomic.Uint64              // flows refused: their rule's uplinks were down, on_down = "drop"
	Failed     [FailReasons]atomic.Uint64 // new flows that could not be decided as the policy says
	Received   atomic.Uint64              // first packets received through the prefilter's queue rules
	QueueFull  atomic.Uint64              // what the kernel's queue let through unseen: offered - received, latched
	Service    atomic.Uint64              // UDP flows from a local service's socket: only owner rules applied
	ICMPErrors atomic.Uint64              // ICMP errors readdressed to a translated flow's socket
	// KernelDecided: flows the kernel decided itself (host marks), as the
	// daemon learned of them; Moved: of those, moved to another port
	// because a native socket owned their wire tuple.
	KernelDecided atomic.Uint64
	Moved         atomic.Uint64
	// Exceptions: host-marked first packets of an uplink the kernel
	// decides that came to the daemon all the same, by reason.
	Exceptions [ExceptionReasons]atomic.Uint64
	Forwarded  atomic.Uint64 // userspace datapath: packets rewritten after the SYN
	Bytes      atomic.Uint64 // userspace datapath: their bytes
	Errors     [ErrKinds]atomic.Uint64
}

// ErrKind names what went wrong, for the errors metric.
type ErrKind int

const (
	ErrVerdict      ErrKind = iota // a verdict could not be sent
	ErrSocketLookup                // sock_diag failed (not: no such socket)
	ErrNoRoute                     // a marked flow had no route: left untranslated
	ErrNoPort                      // no free source port: the first packet dropped
	ErrLearn                       // a kernel decision's record was lost or could not be entered
	ErrKinds
)

// ErrKindNames are the errors metric's kind labels.
var ErrKindNames = [ErrKinds]string{"verdict", "socket_lookup", "no_route", "no_free_port", "learn"}

// ExceptionReason says why a host-marked first packet that the kernel could
// have decided came to the daemon.
type ExceptionReason int

const (
	ExcKnownTuple ExceptionReason = iota // the socket tuple has a flow (a retransmission, or a new socket on it)
	ExcWireTaken                         // the wire tuple is another translation's or a socket's
	ExcOther                             // a full map, a raw socket's SYN, a race with a change of the uplink
	ExceptionReasons
)

// ExceptionReasonNames are the exceptions metric's reason labels.
var ExceptionReasonNames = [ExceptionReasons]string{"known_tuple", "wire_taken", "other"}

// limiter bounds the log lines of what can happen per packet (a flow that
// could not be decided, a failed lookup): a flood must be counted, not
// logged line by line at the cost of the daemon's time. Every kind is
// counted in the metrics regardless.
type limiter struct {
	second     atomic.Int64  // the second the lines below were counted in
	lines      atomic.Int64  // lines logged in it
	suppressed atomic.Uint64 // lines not logged since the last one that was
}

// linesPerSecond is how many per-packet lines are logged a second.
const linesPerSecond = 20

// allow reports whether a line may be logged now, and how many were
// suppressed before it.
func (l *limiter) allow(now int64) (bool, uint64) {
	sec := now / 1e9
	if old := l.second.Load(); old != sec && l.second.CompareAndSwap(old, sec) {
		l.lines.Store(0)
	}
	if l.lines.Add(1) > linesPerSecond {
		l.suppressed.Add(1)
		return false, 0
	}
	return true, l.suppressed.Swap(0)
}
