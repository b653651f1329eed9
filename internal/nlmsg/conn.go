package nlmsg

import (
	"fmt"
	"time"
	"unsafe"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Conn is a netlink socket for messages built by hand: one system call per
// read or write, on the caller's buffers, nothing allocated. It has one
// owner; it is not safe for concurrent use.
//
// mdlayher/netlink opens and binds it and applies the Config, and then
// hands it over: Dial takes a duplicate of the descriptor and closes the
// library's, which takes the socket out of the runtime's network poller.
// A socket registered there wakes the poller's thread with every reply:
// through the library's SyscallConn the sock_diag lookup took 8-9 µs
// instead of 4.5 µs with two Ps (BENCHMARKS.md). The socket blocks, as each
// user's always did: a reply to a sock_diag request or an nft batch is
// queued by the time the write returns, and the NFQUEUE reader blocks in
// recvfrom on purpose (see package queue).
type Conn struct {
	fd   int
	port uint32
}

// Config is what Dial sets up besides the socket.
type Config struct {
	Groups      uint32        // multicast groups to join at bind (a bitmask, as sockaddr_nl's)
	ReadBuffer  int           // SO_RCVBUFFORCE, if not 0 (needs CAP_NET_ADMIN)
	WriteBuffer int           // SO_SNDBUFFORCE, if not 0 (needs CAP_NET_ADMIN)
	ExtAck      bool          // NETLINK_EXT_ACK: errors come with the kernel's explanation
	ReadTimeout time.Duration // SO_RCVTIMEO, if not 0: a blocking read returns EAGAIN after it
}

// Dial opens and binds a netlink socket of protocol proto (unix.NETLINK_*)
// in the calling thread's network namespace, and applies cfg.
func Dial(proto int, cfg Config) (*Conn, error) {
	nl, err := netlink.Dial(proto, &netlink.Config{Groups: cfg.Groups})
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	defer nl.Close() // the duplicate below is the socket from then on
	if cfg.ReadBuffer > 0 {
		if err := ForceReadBuffer(nl, cfg.ReadBuffer); err != nil {
			return nil, err
		}
	}
	rc, err := nl.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	fd := -1
	var serr error
	if err := rc.Control(func(s uintptr) { fd, serr = setup(int(s), cfg) }); err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	if serr != nil {
		return nil, serr
	}
	return &Conn{fd: fd, port: nl.PID()}, nil
}

// setup applies cfg to the library's socket s, and returns a blocking
// duplicate of it that closes on exec.
func setup(s int, cfg Config) (int, error) {
	for _, o := range []struct {
		what     string
		on       bool
		level    int
		opt, val int
	}{
		{"SO_SNDBUFFORCE", cfg.WriteBuffer > 0, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, cfg.WriteBuffer},
		{"NETLINK_EXT_ACK", cfg.ExtAck, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1},
	} {
		if !o.on {
			continue
		}
		if err := unix.SetsockoptInt(s, o.level, o.opt, o.val); err != nil {
			return -1, fmt.Errorf("%s: %w", o.what, err)
		}
	}
	if cfg.ReadTimeout > 0 {
		tv := unix.NsecToTimeval(cfg.ReadTimeout.Nanoseconds())
		if err := unix.SetsockoptTimeval(s, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
			return -1, fmt.Errorf("SO_RCVTIMEO: %w", err)
		}
	}
	fd, err := unix.FcntlInt(uintptr(s), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("netlink socket: dup: %w", err)
	}
	// O_NONBLOCK belongs to the socket, not the descriptor: the duplicate
	// shares it, and the library set it.
	if err := unix.SetNonblock(fd, false); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("netlink socket: blocking mode: %w", err)
	}
	return fd, nil
}

// ForceReadBuffer sets the receive buffer of a socket used through the
// library's own calls (a subscription) beyond the system's limit
// (SO_RCVBUFFORCE, which needs CAP_NET_ADMIN).
func ForceReadBuffer(nl *netlink.Conn, n int) error {
	rc, err := nl.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("SO_RCVBUFFORCE: %w", serr)
	}
	return nil
}

// PortID is the socket's netlink port: the sender the kernel names in the
// notifications of its messages.
func (c *Conn) PortID() uint32 { return c.port }

// Close closes the socket.
func (c *Conn) Close() error { return unix.Close(c.fd) }

// Fd is the socket's descriptor, for poll(2); it stays the Conn's.
func (c *Conn) Fd() int { return c.fd }

// Recv reads one datagram into b with recvfrom flags (0 or
// unix.MSG_DONTWAIT), returning its length or the errno; it retries when
// interrupted (a socket with SO_RCVTIMEO is not restarted after a signal,
// and the Go runtime's preemption signals come often).
func (c *Conn) Recv(b []byte, flags int) (int, unix.Errno) {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	for {
		r, _, errno := unix.Syscall6(unix.SYS_RECVFROM, uintptr(c.fd), uintptr(p), uintptr(len(b)), uintptr(flags), 0, 0)
		switch errno {
		case 0:
			return int(r), 0
		case unix.EINTR:
			continue
		}
		return 0, errno
	}
}

// Send writes b, one or more messages, as one datagram; it retries when
// interrupted.
func (c *Conn) Send(b []byte) unix.Errno {
	var p unsafe.Pointer
	if len(b) > 0 {
		p = unsafe.Pointer(&b[0])
	}
	for {
		_, _, errno := unix.Syscall(unix.SYS_WRITE, uintptr(c.fd), uintptr(p), uintptr(len(b)))
		if errno != unix.EINTR {
			return errno
		}
	}
}

// Sendv writes the buffers iov points at as one datagram (writev); it
// retries when interrupted.
func (c *Conn) Sendv(iov []unix.Iovec) unix.Errno {
	var p unsafe.Pointer
	if len(iov) > 0 {
		p = unsafe.Pointer(&iov[0])
	}
	for {
		_, _, errno := unix.Syscall(unix.SYS_WRITEV, uintptr(c.fd), uintptr(p), uintptr(len(iov)))
		if errno != unix.EINTR {
			return errno
		}
	}
}
