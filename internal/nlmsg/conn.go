package nlmsg

import (
	"fmt"
	"syscall"
	"time"
	"unsafe"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Conn is a netlink socket for messages built by hand, opened and bound by
// mdlayher/netlink and used through its syscall.RawConn: one system call
// per read or write, on the caller's buffers, nothing allocated. It has one
// owner; it is not safe for concurrent use.
//
// The socket blocks. A reply to a sock_diag request or an nft batch is
// queued by the time the write returns, so a blocking read costs nothing
// more; and the NFQUEUE reader blocks in recvfrom on purpose, which wakes
// its thread directly instead of parking the goroutine on the runtime's
// poller (see package queue). So I/O goes through RawConn.Control, never
// RawConn.Read or Write, which would park on the poller.
type Conn struct {
	nl *netlink.Conn
	rc syscall.RawConn

	// The arguments and result of the call in progress. The functions
	// given to Control are built once, in Dial, and read them from here:
	// a closure built per call would escape through the RawConn interface
	// and cost an allocation each time.
	buf    []byte
	iov    []unix.Iovec
	flags  int
	n      int
	errno  unix.Errno
	recvFn func(fd uintptr)
	sendFn func(fd uintptr)
	vecFn  func(fd uintptr)
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
	c := &Conn{nl: nl}
	if c.rc, err = nl.SyscallConn(); err != nil {
		nl.Close()
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	c.recvFn = c.recv
	c.sendFn = c.send
	c.vecFn = c.sendv
	setup := func(what string, f func(fd int) error) {
		if err != nil {
			return
		}
		var serr error
		if cerr := c.rc.Control(func(fd uintptr) { serr = f(int(fd)) }); cerr != nil {
			serr = cerr
		}
		if serr != nil {
			err = fmt.Errorf("%s: %w", what, serr)
		}
	}
	setup("blocking mode", func(fd int) error { return unix.SetNonblock(fd, false) })
	if cfg.ReadBuffer > 0 && err == nil {
		err = ForceReadBuffer(nl, cfg.ReadBuffer)
	}
	if cfg.WriteBuffer > 0 {
		setup("SO_SNDBUFFORCE", func(fd int) error {
			return unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, cfg.WriteBuffer)
		})
	}
	if cfg.ExtAck {
		setup("NETLINK_EXT_ACK", func(fd int) error {
			return unix.SetsockoptInt(fd, unix.SOL_NETLINK, unix.NETLINK_EXT_ACK, 1)
		})
	}
	if cfg.ReadTimeout > 0 {
		tv := unix.NsecToTimeval(cfg.ReadTimeout.Nanoseconds())
		setup("SO_RCVTIMEO", func(fd int) error {
			return unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		})
	}
	if err != nil {
		nl.Close()
		return nil, err
	}
	return c, nil
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
func (c *Conn) PortID() uint32 { return c.nl.PID() }

// Close closes the socket.
func (c *Conn) Close() error { return c.nl.Close() }

// Recv reads one datagram into b with recvfrom flags (0 or
// unix.MSG_DONTWAIT), returning its length or the errno. EINTR is the
// caller's to retry.
func (c *Conn) Recv(b []byte, flags int) (int, unix.Errno) {
	c.buf, c.flags = b, flags
	errno := c.control(c.recvFn)
	c.buf = nil
	return c.n, errno
}

func (c *Conn) recv(fd uintptr) {
	var p unsafe.Pointer
	if len(c.buf) > 0 {
		p = unsafe.Pointer(&c.buf[0])
	}
	r, _, errno := unix.Syscall6(unix.SYS_RECVFROM, fd, uintptr(p), uintptr(len(c.buf)), uintptr(c.flags), 0, 0)
	c.n, c.errno = int(r), errno
}

// Send writes b, one or more messages, as one datagram; it retries when
// interrupted.
func (c *Conn) Send(b []byte) unix.Errno {
	c.buf = b
	errno := c.control(c.sendFn)
	for errno == unix.EINTR {
		errno = c.control(c.sendFn)
	}
	c.buf = nil
	return errno
}

func (c *Conn) send(fd uintptr) {
	var p unsafe.Pointer
	if len(c.buf) > 0 {
		p = unsafe.Pointer(&c.buf[0])
	}
	_, _, c.errno = unix.Syscall(unix.SYS_WRITE, fd, uintptr(p), uintptr(len(c.buf)))
}

// Sendv writes the buffers iov points at as one datagram (writev); it
// retries when interrupted.
func (c *Conn) Sendv(iov []unix.Iovec) unix.Errno {
	c.iov = iov
	errno := c.control(c.vecFn)
	for errno == unix.EINTR {
		errno = c.control(c.vecFn)
	}
	c.iov = nil
	return errno
}

func (c *Conn) sendv(fd uintptr) {
	var p unsafe.Pointer
	if len(c.iov) > 0 {
		p = unsafe.Pointer(&c.iov[0])
	}
	_, _, c.errno = unix.Syscall(unix.SYS_WRITEV, fd, uintptr(p), uintptr(len(c.iov)))
}

// control runs f on the socket and returns its errno; EBADF once the
// socket is closed.
func (c *Conn) control(f func(fd uintptr)) unix.Errno {
	c.n, c.errno = 0, 0
	if err := c.rc.Control(f); err != nil {
		return unix.EBADF
	}
	return c.errno
}
