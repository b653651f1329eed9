package sockdiag

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// sockDestroy is SOCK_DESTROY (linux/sock_diag.h).
const sockDestroy = 21

// ErrCannotDestroy: the kernel does not destroy the socket in its state.
// Kernels before 6.0 answer so for a TIME_WAIT socket, which sends nothing
// of its own any more (EOPNOTSUPP).
var ErrCannotDestroy = errors.New("the kernel cannot destroy a socket in this state (TIME_WAIT before Linux 6.0)")

// Destroy closes the TCP socket local→remote whose cookie is cookie from
// outside, as `ss -K` does (the kernel needs CONFIG_INET_DIAG_DESTROY):
// the application's next call on it fails at once (ECONNABORTED), and the
// peer gets a reset. It returns ErrNotFound when the socket is gone, and
// ErrCannotDestroy when the kernel cannot destroy it in its state.
func (c *Conn) Destroy(local, remote netip.AddrPort, cookie uint64) error {
	return c.DestroyProto(unix.IPPROTO_TCP, local, remote, cookie)
}

// DestroyProto is Destroy for a TCP or a UDP socket (a UDP socket's next
// call fails with ECONNABORTED).
func (c *Conn) DestroyProto(proto uint8, local, remote netip.AddrPort, cookie uint64) error {
	c.request(proto, local, remote, false)
	ne := binary.NativeEndian
	ne.PutUint16(c.req[4:], sockDestroy)
	ne.PutUint16(c.req[6:], unix.NLM_F_REQUEST|unix.NLM_F_ACK)
	r := c.req[nlmsgHdrLen:]
	ne.PutUint32(r[48:], uint32(cookie))
	ne.PutUint32(r[52:], uint32(cookie>>32))
	if _, err := unix.Write(c.fd, c.req[:]); err != nil {
		return fmt.Errorf("sock_diag destroy: %w", err)
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
