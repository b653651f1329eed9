package sockdiag

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"golang.org/x/sys/unix"
)

// sockDestroy is SOCK_DESTROY (linux/sock_diag.h).
const sockDestroy = 21

// Destroy closes the TCP socket local→remote whose cookie is cookie from
// outside, as `ss -K` does (the kernel needs CONFIG_INET_DIAG_DESTROY):
// the application's next call on it fails at once (ECONNABORTED), and the
// peer gets a reset. It returns ErrNotFound when the socket is gone.
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
	}
	return fmt.Errorf("sock_diag destroy %s→%s: %w", local, remote, err)
}
