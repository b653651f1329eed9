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
	nlmsgHdrLen      = 16
	reqLen           = 56 // struct inet_diag_req_v2
	msgLen           = 72 // struct inet_diag_msg
	noCookie         = 0xffffffff
)

// Conn is a NETLINK_SOCK_DIAG socket with its buffers.
type Conn struct {
	fd  int
	seq uint32
	req [nlmsgHdrLen + reqLen]byte
	buf []byte
}

// Open opens a sock_diag socket in the caller's network namespace.
func Open() (*Conn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("sock_diag socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("sock_diag bind: %w", err)
	}
	return &Conn{fd: fd, buf: make([]byte, 64<<10)}, nil
}

// Close closes the socket.
func (c *Conn) Close() error { return unix.Close(c.fd) }

// ErrNotFound is returned by Lookup when no socket owns the tuple.
var ErrNotFound = errors.New("no such socket")

// Lookup finds the socket that owns the connection local→remote, in any
// state including TIME_WAIT, and fills s. It returns ErrNotFound when there
// is none, and then s is zero: a Socket reused from an earlier lookup never
// tells of another socket. For UDP it is the socket a datagram from remote to local would
// be delivered to: a connected socket, else one bound to the port (wildcard
// or local address), so an unconnected socket is found for every peer.
func (c *Conn) Lookup(proto uint8, local, remote netip.AddrPort, s *Socket) error {
	if proto == unix.IPPROTO_UDP {
		// The kernel's UDP lookup takes the request's source as the
		// datagram's source, the peer (udp_dump_one: "src and dst are
		// swapped for historical reasons").
		local, remote = remote, local
	}
	*s = Socket{}
	c.request(proto, local, remote, false)
	if _, err := unix.Write(c.fd, c.req[:]); err != nil {
		return fmt.Errorf("sock_diag request: %w", err)
	}
	found := false
	err := c.receive(func(m []byte) {
		found = parseMsg(m, s) == nil
	})
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return ErrNotFound
		}
		return err
	}
	if !found {
		return ErrNotFound
	}
	return nil
}

// Dump calls fn for every socket of proto in family (unix.AF_INET or
// unix.AF_INET6), TIME_WAIT included. The Socket passed to fn is reused.
func (c *Conn) Dump(family, proto uint8, fn func(*Socket)) error {
	var zero netip.AddrPort
	if family == unix.AF_INET6 {
		zero = netip.AddrPortFrom(netip.IPv6Unspecified(), 0)
	} else {
		zero = netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
	}
	c.request(proto, zero, zero, true)
	if _, err := unix.Write(c.fd, c.req[:]); err != nil {
		return fmt.Errorf("sock_diag dump request: %w", err)
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

func (c *Conn) request(proto uint8, local, remote netip.AddrPort, dump bool) {
	c.seq++
	b := c.req[:]
	clear(b)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], uint32(len(b)))
	ne.PutUint16(b[4:], sockDiagByFamily)
	flags := uint16(unix.NLM_F_REQUEST)
	if dump {
		flags |= unix.NLM_F_DUMP
	}
	ne.PutUint16(b[6:], flags)
	ne.PutUint32(b[8:], c.seq)
	r := b[nlmsgHdrLen:]
	r[0] = unix.AF_INET
	if local.Addr().Is6() && !local.Addr().Is4In6() {
		r[0] = unix.AF_INET6
	}
	r[1] = proto
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
	ne := binary.NativeEndian
	for {
		n, err := unix.Read(c.fd, c.buf)
		if err != nil {
			if err == unix.EINTR {
				continue
			}
			return err
		}
		b := c.buf[:n]
		for len(b) >= nlmsgHdrLen {
			l := int(ne.Uint32(b[0:]))
			typ := ne.Uint16(b[4:])
			flags := ne.Uint16(b[6:])
			seq := ne.Uint32(b[8:])
			if l < nlmsgHdrLen || l > len(b) {
				return fmt.Errorf("sock_diag: malformed netlink message")
			}
			msg := b[nlmsgHdrLen:l]
			b = b[min(nlmAlign(l), len(b)):]
			if seq != c.seq {
				continue // a late reply to an earlier request
			}
			switch typ {
			case unix.NLMSG_DONE:
				return nil
			case unix.NLMSG_ERROR:
				if len(msg) >= 4 {
					if code := int32(ne.Uint32(msg)); code != 0 {
						return unix.Errno(-code)
					}
				}
				return nil
			case sockDiagByFamily:
				fn(msg)
				if flags&unix.NLM_F_MULTI == 0 {
					return nil // exact lookup: a single reply
				}
			}
		}
	}
}

func nlmAlign(n int) int { return (n + 3) &^ 3 }

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
	for a := m[msgLen:]; len(a) >= 4; {
		l := int(ne.Uint16(a[0:]))
		typ := ne.Uint16(a[2:])
		if l < 4 || l > len(a) {
			break
		}
		if typ == inetDiagCgroupID && l >= 12 {
			s.CgroupID = ne.Uint64(a[4:])
		}
		a = a[min(nlmAlign(l), len(a)):]
	}
	return nil
}
