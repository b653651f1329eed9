package sockdiag

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/nlmsg"
	"golang.org/x/sys/unix"
)

// sockDestroy is SOCK_DESTROY (linux/sock_diag.h).
const sockDestroy = 21

// ErrCannotDestroy: the kernel does not destroy the socket in its state.
// Kernels before 6.0 answer so for a TIME_WAIT socket, which sends nothing
// of its own any more (EOPNOTSUPP).
var ErrCannotDestroy = errors.New("the kernel cannot destroy a socket in this state (TIME_WAIT before Linux 6.0)")

// Destroy closes the TCP or UDP socket local→remote whose cookie is
// cookie from outside, as `ss -K` does (the kernel needs
// CONFIG_INET_DIAG_DESTROY): the application's next call on it fails at
// once (ECONNABORTED), and a TCP peer gets a reset. It returns ErrNotFound
// when the socket is gone, and ErrCannotDestroy when the kernel cannot
// destroy it in its state.
func (c *Conn) Destroy(proto ipproto.Proto, local, remote netip.AddrPort, cookie uint64) error {
	c.request(proto, local, remote, false)
	nlmsg.PutHeader(c.req[:], nlmsg.Header{Len: uint32(len(c.req)), Type: sockDestroy, Flags: unix.NLM_F_REQUEST | unix.NLM_F_ACK, Seq: c.seq})
	r := c.req[nlmsg.HeaderLen:]
	binary.NativeEndian.PutUint32(r[48:], uint32(cookie))
	binary.NativeEndian.PutUint32(r[52:], uint32(cookie>>32))
	if errno := c.nl.Send(c.req[:]); errno != 0 {
		return fmt.Errorf("sock_diag destroy: %w", errno)
	}
	err := c.receive(func([]byte) {})
	switch err {
	case nil:
		return nil
	case unix.ENOENT:
		return ErrNotFound
	case unix.EOPNOTSUPP:
		return fmt.Errorf("sock_diag destroy %s→%s: %w", local, remote, ErrCannotDestroy)
	}
	return fmt.Errorf("sock_diag destroy %s→%s: %w", local, remote, err)
}
