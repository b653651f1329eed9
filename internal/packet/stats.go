package packet

import "sync/atomic"

// Stats counts what the packet path did, and how flows ended, for the
// logs and the metrics. The daemon's other goroutines count their errors
// here too, so that one metric has every kind.
type Stats struct {
	SYNs       atomic.Uint64              // SYNs decided
	Datagrams  atomic.Uint64              // UDP and echo flows decided
	Idle       atomic.Uint64              // UDP and echo flows ended by idleness
	UDPClosed  atomic.Uint64              // UDP flows ended when the kernel announced their socket's end
	Translated atomic.Uint64              // new flows translated
	Retrans    atomic.Uint64              // retransmitted SYNs of translated flows
	RawSYNs    atomic.Uint64              // SYNs no TCP socket owns (raw sockets): decided without an owner
	Dropped    atomic.Uint64              // packets dropped (the socket retries)
	Refused    atomic.Uint64              // flows refused: their rule's uplinks were down, on_down = "drop"
	Failed     [FailReasons]atomic.Uint64 // new flows that could not be decided as the policy says
	Received   atomic.Uint64              // first packets received through the prefilter's queue rules
	QueueFull  atomic.Uint64              // what the kernel's queue let through unseen: offered - received, latched
	Service    atomic.Uint64              // UDP flows from a local service's socket: only owner rules applied
	ICMPErrors atomic.Uint64              // ICMP errors readdressed to a translated flow's socket
	Forwarded  atomic.Uint64              // userspace datapath: packets rewritten after the SYN
	Bytes      atomic.Uint64              // userspace datapath: their bytes
	Errors     [ErrKinds]atomic.Uint64
}

// ErrKind names what went wrong, for the errors metric.
type ErrKind int

const (
	ErrVerdict      ErrKind = iota // a verdict could not be sent
	ErrSocketLookup                // sock_diag failed (not: no such socket)
	ErrNoRoute                     // a marked flow had no route: left untranslated
	ErrNoPort                      // no free source port: the first packet dropped
	ErrInstall                     // the kernel refused a flow's elements
	ErrRemove                      // the kernel refused to remove a flow's elements
	ErrQueueReceive                // reading the queue failed
	ErrSweep                       // a socket dump or counter read failed: nothing removed that round
	ErrRepair                      // the table could not be checked or put back
	ErrCloseEvents                 // the kernel's announcements of UDP sockets' ends were lost
	ErrKinds
)

// ErrKindNames are the errors metric's kind labels.
var ErrKindNames = [ErrKinds]string{"verdict", "socket_lookup", "no_route", "no_free_port", "install", "remove", "nfqueue_receive", "sweep", "repair", "udp_close_events"}
