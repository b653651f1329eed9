package sockdiag

import (
	"errors"
	"fmt"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// sock_diag's multicast groups (include/uapi/linux/sock_diag.h): the
// kernel announces there each socket it destroys.
const (
	groupUDPDestroy  = 2 // SKNLGRP_INET_UDP_DESTROY
	groupUDP6Destroy = 4 // SKNLGRP_INET6_UDP_DESTROY
)

// Destroyed receives the kernel's announcements of UDP sockets destroyed,
// IPv4 and IPv6, as they come: the moment a UDP socket's tuple is free for
// another socket. It needs
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
