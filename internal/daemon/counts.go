package daemon

import "sync/atomic"

// counts are what the daemon's own goroutines (the sweeper, the repairs,
// the installer's failures, the queue readers) count, for the logs and the
// metrics; the packet path counts in packet.Stats.
type counts struct {
	errors    [errKinds]atomic.Uint64
	idle      atomic.Uint64 // UDP and echo flows ended by idleness
	udpClosed atomic.Uint64 // UDP flows ended when the kernel announced their socket's end
}

// errKind names what went wrong outside the packet path, for the errors
// metric (its other kinds are packet.ErrKind).
type errKind int

const (
	errInstall        errKind = iota // the kernel refused a flow's elements
	errRemove                        // the kernel refused to remove a flow's elements
	errQueueReceive                  // reading the queue failed
	errSweep                         // a socket dump or counter read failed: nothing removed that round
	errRepair                        // the table could not be checked or put back
	errUDPCloseEvents                // the kernel's announcements of UDP sockets' ends were lost
	errUsage                         // usage accounting: the counts could not be read, kept or written
	errTCPCloseEvents                // the kernel's announcements of TCP sockets' ends were lost
	errKinds
)

// errKindNames are the errors metric's kind labels.
var errKindNames = [errKinds]string{"install", "remove", "nfqueue_receive", "sweep", "repair", "udp_close_events", "usage", "tcp_close_events"}
