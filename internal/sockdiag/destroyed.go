package sockdiag

import (
	"errors"
	"fmt"

	"github.com/mdlayher/netlink"
	"github.com/rerouted/rerouted/internal/nlmsg"
	"golang.org/x/sys/unix"
)

// sock_diag's multicast groups (include/uapi/linux/sock_diag.h): the
// kernel announces there each socket it destroys.
const (
	groupTCPDestroy  = 1 // SKNLGRP_INET_TCP_DESTROY
	groupUDPDestroy  = 2 // SKNLGRP_INET_UDP_DESTROY
	groupTCP6Destroy = 3 // SKNLGRP_INET6_TCP_DESTROY
	groupUDP6Destroy = 4 // SKNLGRP_INET6_UDP_DESTROY
)

// Destroyed receives the kernel's announcements of UDP sockets destroyed,
// IPv4 and IPv6, as they come: the moment a UDP socket's tuple is free for
// another socket. (TCP's are read in batches: Polled.) It needs
// CAP_NET_ADMIN. Not safe for concurrent use.
type Destroyed struct {
	c *netlink.Conn
}

// WatchUDPDestroyed subscribes to the announcements of UDP sockets.
func WatchUDPDestroyed() (*Destroyed, error) {
	c, err := netlink.Dial(unix.NETLINK_SOCK_DIAG, &netlink.Config{
		Groups: 1<<(groupUDPDestroy-1) | 1<<(groupUDP6Destroy-1),
	})
	if err != nil {
		return nil, fmt.Errorf("sock_diag: subscribe to UDP socket destruction: %w", err)
	}
	// A host that closes thousands of UDP sockets a second (a resolver's
	// clients) must not overflow it between two reads.
	if err := c.SetReadBuffer(4 << 20); err != nil {
		c.Close()
		return nil, fmt.Errorf("sock_diag: receive buffer: %w", err)
	}
	return &Destroyed{c: c}, nil
}

// ErrLost says announcements were lost (the receive buffer overflowed):
// sockets may have gone unannounced.
var ErrLost = errors.New("sock_diag: socket destruction announcements lost")

// Receive blocks until announcements arrive and calls fn for each
// destroyed socket. It returns ErrLost after an overflow, and an error
// once Close was called.
func (d *Destroyed) Receive(fn func(*Socket)) error {
	msgs, err := d.c.Receive()
	if err != nil {
		if errors.Is(err, unix.ENOBUFS) {
			return ErrLost
		}
		return fmt.Errorf("sock_diag: receive socket destruction: %w", err)
	}
	var s Socket
	for _, m := range msgs {
		if m.Header.Type != sockDiagByFamily {
			continue
		}
		if err := parseMsg(m.Data, &s); err != nil {
			return err
		}
		fn(&s)
	}
	return nil
}

// Close ends the subscription; a blocked Receive returns.
func (d *Destroyed) Close() error { return d.c.Close() }

// Polled receives the kernel's announcements of TCP sockets destroyed,
// IPv4 and IPv6, in batches: Wait blocks until the first comes, and Drain
// reads all that came. A reader that read each as it came would be woken
// for each, and a host that ends thousands of connections a second would
// pay that much; a reader that waits a few milliseconds between Wait and
// Drain is woken once per batch, and never while no socket ends. Its
// buffer is reused: reading allocates nothing. Not safe for concurrent
// use.
type Polled struct {
	c    *nlmsg.Conn
	wake int            // an eventfd: Stop's way to end a Wait
	poll [2]unix.PollFd // the socket, and wake
	buf  []byte
	s    Socket
}

// PollTCPDestroyed subscribes to the announcements of TCP sockets.
func PollTCPDestroyed() (*Polled, error) {
	c, err := nlmsg.Dial(unix.NETLINK_SOCK_DIAG, nlmsg.Config{
		Groups:     1<<(groupTCPDestroy-1) | 1<<(groupTCP6Destroy-1),
		ReadBuffer: 4 << 20,
	})
	if err != nil {
		return nil, fmt.Errorf("sock_diag: subscribe to TCP socket destruction: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("sock_diag: eventfd: %w", err)
	}
	p := &Polled{c: c, wake: wake, buf: make([]byte, 64<<10)}
	p.poll = [2]unix.PollFd{{Fd: int32(c.Fd()), Events: unix.POLLIN}, {Fd: int32(wake), Events: unix.POLLIN}}
	return p, nil
}

// Wait blocks until an announcement is queued (or the queue overflowed),
// and reports whether one is; it returns false once Stop was called. It
// reads nothing: Drain does. It allocates nothing.
func (p *Polled) Wait() (bool, error) {
	p.poll[0].Revents, p.poll[1].Revents = 0, 0
	for {
		_, err := unix.Poll(p.poll[:], -1)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return false, fmt.Errorf("sock_diag: wait for socket destruction: %w", err)
		case p.poll[1].Revents != 0:
			return false, nil
		}
		return true, nil // readable, or an error (an overflow) that Drain returns
	}
}

// Stop makes a blocked Wait return, and every later one. Safe to call
// from another goroutine than Wait's.
func (p *Polled) Stop() error {
	one := [8]byte{1}
	if _, err := unix.Write(p.wake, one[:]); err != nil && err != unix.EAGAIN {
		return fmt.Errorf("sock_diag: stop waiting: %w", err)
	}
	return nil
}

// Drain calls fn for each socket announced since the last Drain. It
// returns ErrLost after an overflow (the next Drain reads what came after
// it).
func (p *Polled) Drain(fn func(*Socket)) error {
	for {
		r, errno := p.c.Recv(p.buf, unix.MSG_DONTWAIT)
		switch errno {
		case 0:
		case unix.EAGAIN:
			return nil
		case unix.ENOBUFS:
			return ErrLost
		default:
			return fmt.Errorf("sock_diag: receive socket destruction: %w", errno)
		}
		for b := p.buf[:r]; len(b) >= nlmsg.HeaderLen; {
			h, payload, rest, err := nlmsg.Split(b)
			if err != nil {
				return fmt.Errorf("sock_diag: socket destruction: %w", err)
			}
			b = rest
			if h.Type != sockDiagByFamily {
				continue
			}
			if err := parseMsg(payload, &p.s); err != nil {
				return err
			}
			fn(&p.s)
		}
	}
}

// Close ends the subscription. Call it once no Wait or Drain runs.
func (p *Polled) Close() error { return errors.Join(p.c.Close(), unix.Close(p.wake)) }
