// Package sockdiag finds local sockets through NETLINK_SOCK_DIAG: an exact
// lookup of one connection's socket (its state, owner uid, inode, cookie and
// cgroup id), and a dump of every socket of a protocol.
//
// A Conn owns one netlink socket and preallocated buffers; it is not safe for
// concurrent use. The exact lookup allocates nothing.
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

// TCP states as the kernel numbers them (include/net/tcp_states.h).
const (
	StateEstablished = 1
	StateSynSent     = 2
	StateTimeWait    = 6
	StateListen      = 10
)

var stateNames = [...]string{"", "ESTABLISHED", "SYN_SENT", "SYN_RECV", "FIN_WAIT1", "FIN_WAIT2",
	"TIME_WAIT", "CLOSE", "CLOSE_WAIT", "LAST_ACK", "LISTEN", "CLOSING", "NEW_SYN_RECV"}

// StateName returns the kernel's name of a TCP state.
func StateName(s uint8) string {
	if int(s) < len(stateNames) {
		return stateNames[s]
	}
	return fmt.Sprintf("STATE_%d", s)
}

// Socket is what the kernel reports about one socket.
type Socket struct {
	Local, Remote netip.AddrPort
	State         uint8
	UID           uint32
	Inode         uint32 // 0 for TIME_WAIT sockets
	Cookie        uint64
	CgroupID      uint64 // 0 when the kernel did not report it
}

const (
	sockDiagByFamily = 20
	inetDiagCgroupID = 21
	reqLen           = 56 // struct inet_diag_req_v2
	msgLen           = 72 // struct inet_diag_msg
	noCookie         = 0xffffffff
)

// Sockets is sock_diag as rerouted uses it, the one seam every user of
// sock_diag takes: the packet path's exact lookups (allocation-free), the
// sweeper's dumps, the closing of sockets whose address went away. A *Conn
// is one; the tests' is sockdiagtest.Sockets. As a Conn, a Sockets is
// used by one goroutine at a time.
type Sockets interface {
	// Lookup finds the socket on a tuple (Conn.Lookup); ErrNotFound if none.
	Lookup(proto ipproto.Proto, local, remote netip.AddrPort) (Socket, error)
	// Dump calls fn for every socket of proto in family (Conn.Dump).
	Dump(family uint8, proto ipproto.Proto, fn func(*Socket)) error
	// Destroy closes the socket on a tuple if its cookie matches
	// (Conn.Destroy).
	Destroy(proto ipproto.Proto, local, remote netip.AddrPort, cookie uint64) error
	Close() error
}

// OpenSockets is Open as a Sockets, for those that open one per use.
func OpenSockets() (Sockets, error) {
	c, err := Open()
	if err != nil {
		return nil, err
	}
	return c, nil
}

var _ Sockets = (*Conn)(nil)

// Conn is a NETLINK_SOCK_DIAG socket with its buffers.
type Conn struct {
	nl  *nlmsg.Conn
	seq uint32
	req [nlmsg.HeaderLen + reqLen]byte
	buf []byte
}

// Open opens a sock_diag socket in the caller's network namespace.
func Open() (*Conn, error) {
	nl, err := nlmsg.Dial(unix.NETLINK_SOCK_DIAG, nlmsg.Config{})
	if err != nil {
		return nil, fmt.Errorf("sock_diag: %w", err)
	}
	return &Conn{nl: nl, buf: make([]byte, 64<<10)}, nil
}

// Close closes the socket.
func (c *Conn) Close() error { return c.nl.Close() }

// ErrNotFound is returned by Lookup when no socket owns the tuple.
var ErrNotFound = errors.New("no such socket")

// Lookup finds the socket that owns the connection local→remote, in any
// state including TIME_WAIT. It returns ErrNotFound, and a zero Socket,
// when there is none. For UDP it is the socket a datagram from remote to
// local would be delivered to: a connected socket, else one bound to the
// port (wildcard or local address), so an unconnected socket is found for
// every peer. It allocates nothing: the Socket is returned by value, so
// that nothing of a caller's escapes through an interface (Sockets).
func (c *Conn) Lookup(proto ipproto.Proto, local, remote netip.AddrPort) (s Socket, err error) {
	if proto == ipproto.UDP {
		// The kernel's UDP lookup takes the request's source as the
		// datagram's source, the peer (udp_dump_one: "src and dst are
		// swapped for historical reasons").
		local, remote = remote, local
	}
	c.request(proto, local, remote, false)
	if errno := c.nl.Send(c.req[:]); errno != 0 {
		return Socket{}, fmt.Errorf("sock_diag request: %w", errno)
	}
	found := false
	err = c.receive(func(m []byte) {
		found = parseMsg(m, &s) == nil
	})
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return Socket{}, ErrNotFound
		}
		return Socket{}, err
	}
	if !found {
		return Socket{}, ErrNotFound
	}
	return s, nil
}

// Dump calls fn for every socket of proto in family (unix.AF_INET or
// unix.AF_INET6), TIME_WAIT included. The Socket passed to fn is reused.
func (c *Conn) Dump(family uint8, proto ipproto.Proto, fn func(*Socket)) error {
	var zero netip.AddrPort
	if family == unix.AF_INET6 {
		zero = netip.AddrPortFrom(netip.IPv6Unspecified(), 0)
	} else {
		zero = netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
	}
	c.request(proto, zero, zero, true)
	if errno := c.nl.Send(c.req[:]); errno != 0 {
		return fmt.Errorf("sock_diag dump request: %w", errno)
	}
	var s Socket
	var perr error
	err := c.receive(func(m []byte) {
		if err := parseMsg(m, &s); err != nil {
			perr = err
			return
		}
		fn(&s)
	})
	if err != nil {
		return fmt.Errorf("sock_diag dump: %w", err)
	}
	return perr
}

func (c *Conn) request(proto ipproto.Proto, local, remote netip.AddrPort, dump bool) {
	c.seq++
	b := c.req[:]
	clear(b)
	ne := binary.NativeEndian
	flags := uint16(unix.NLM_F_REQUEST)
	if dump {
		flags |= unix.NLM_F_DUMP
	}
	nlmsg.PutHeader(b, nlmsg.Header{Len: uint32(len(b)), Type: sockDiagByFamily, Flags: flags, Seq: c.seq})
	r := b[nlmsg.HeaderLen:]
	r[0] = unix.AF_INET
	if local.Addr().Is6() && !local.Addr().Is4In6() {
		r[0] = unix.AF_INET6
	}
	r[1] = byte(proto)
	r[2] = 0                        // idiag_ext: no optional blocks
	ne.PutUint32(r[4:], 0xffffffff) // all states
	binary.BigEndian.PutUint16(r[8:], local.Port())
	binary.BigEndian.PutUint16(r[10:], remote.Port())
	putAddr(r[12:28], local.Addr())
	putAddr(r[28:44], remote.Addr())
	ne.PutUint32(r[48:], noCookie) // any cookie
	ne.PutUint32(r[52:], noCookie)
}

func putAddr(b []byte, a netip.Addr) {
	if a.Is4() || a.Is4In6() {
		a4 := a.Unmap().As4()
		copy(b, a4[:])
		return
	}
	a16 := a.As16()
	copy(b, a16[:])
}

// receive reads replies to the current request until it is complete, calling
// fn with each inet_diag message.
func (c *Conn) receive(fn func([]byte)) error {
	for {
		n, errno := c.nl.Recv(c.buf, 0)
		if errno != 0 {
			return errno
		}
		for b := c.buf[:n]; len(b) >= nlmsg.HeaderLen; {
			h, msg, rest, err := nlmsg.Split(b)
			if err != nil {
				return fmt.Errorf("sock_diag: %w", err)
			}
			b = rest
			if h.Seq != c.seq {
				continue // a late reply to an earlier request
			}
			switch h.Type {
			case unix.NLMSG_DONE:
				return nil
			case unix.NLMSG_ERROR:
				return nlmsg.Error(msg)
			case sockDiagByFamily:
				fn(msg)
				if h.Flags&unix.NLM_F_MULTI == 0 {
					return nil // exact lookup: a single reply
				}
			}
		}
	}
}

func parseMsg(m []byte, s *Socket) error {
	if len(m) < msgLen {
		return fmt.Errorf("sock_diag: short inet_diag_msg (%d bytes)", len(m))
	}
	ne := binary.NativeEndian
	family := m[0]
	s.State = m[1]
	sport := binary.BigEndian.Uint16(m[4:])
	dport := binary.BigEndian.Uint16(m[6:])
	if family == unix.AF_INET {
		s.Local = netip.AddrPortFrom(netip.AddrFrom4([4]byte(m[8:12])), sport)
		s.Remote = netip.AddrPortFrom(netip.AddrFrom4([4]byte(m[24:28])), dport)
	} else {
		s.Local = netip.AddrPortFrom(netip.AddrFrom16([16]byte(m[8:24])), sport)
		s.Remote = netip.AddrPortFrom(netip.AddrFrom16([16]byte(m[24:40])), dport)
	}
	s.Cookie = uint64(ne.Uint32(m[44:])) | uint64(ne.Uint32(m[48:]))<<32
	s.UID = ne.Uint32(m[64:])
	s.Inode = ne.Uint32(m[68:])
	s.CgroupID = 0
	for a := m[msgLen:]; ; {
		typ, v, rest, ok := nlmsg.SplitAttr(a)
		if !ok {
			break
		}
		if typ == inetDiagCgroupID && len(v) >= 8 {
			s.CgroupID = ne.Uint64(v)
		}
		a = rest
	}
	return nil
}
