package networld

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// UDPServer answers every datagram on ServerAddr:port and Server6:port with
// "peer=ADDR:PORT " (the source it saw) followed by the datagram itself.
type UDPServer struct {
	Port  uint16
	conns []*net.UDPConn

	mu    sync.Mutex
	peers []netip.AddrPort
	wg    sync.WaitGroup
}

// ServeUDP starts a UDP server on port, both families, in the internet
// namespace. It stops when the world is closed.
func (w *World) ServeUDP(port uint16) (*UDPServer, error) {
	s := &UDPServer{Port: port}
	for _, a := range []netip.Addr{ServerAddr, Server6} {
		var c *net.UDPConn
		err := w.Net.Do(func() (err error) {
			c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, port)))
			return err
		})
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("listen udp %s in %s: %w", a, w.Net.Name, err)
		}
		s.conns = append(s.conns, c)
		s.wg.Add(1)
		go s.serve(c)
	}
	w.mu.Lock()
	w.closers = append(w.closers, s.Close)
	w.mu.Unlock()
	return s, nil
}

func (s *UDPServer) serve(c *net.UDPConn) {
	defer s.wg.Done()
	buf := make([]byte, 65536)
	for {
		n, peer, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return
		}
		peer = netip.AddrPortFrom(peer.Addr().Unmap(), peer.Port())
		s.mu.Lock()
		s.peers = append(s.peers, peer)
		s.mu.Unlock()
		reply := append([]byte("peer="+peer.String()+" "), buf[:n]...)
		c.WriteToUDPAddrPort(reply, peer)
	}
}

// Peers returns the source of every datagram received so far.
func (s *UDPServer) Peers() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]netip.AddrPort(nil), s.peers...)
}

// Close stops the server.
func (s *UDPServer) Close() {
	for _, c := range s.conns {
		c.Close()
	}
	s.wg.Wait()
}

// UDPSocket opens a UDP socket on the host: connected to dst if connect,
// else unconnected and bound to bind (the zero AddrPort: the wildcard
// address and a port the kernel picks).
func (w *World) UDPSocket(dst netip.AddrPort, connect bool, bind netip.AddrPort) (*net.UDPConn, error) {
	var c *net.UDPConn
	err := w.Host.Do(func() (err error) {
		switch {
		case connect:
			c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
		case bind.IsValid():
			c, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(bind))
		default:
			network := "udp4"
			if dst.Addr().Is6() {
				network = "udp6"
			}
			c, err = net.ListenUDP(network, nil)
		}
		return err
	})
	return c, err
}

// AskUDP sends msg to dst on c (Write if c is connected, else WriteTo),
// waits for the server's answer and returns the source the server saw.
func AskUDP(c *net.UDPConn, dst netip.AddrPort, msg string, timeout time.Duration) (netip.AddrPort, error) {
	var err error
	if c.RemoteAddr() != nil {
		_, err = c.Write([]byte(msg))
	} else {
		_, err = c.WriteToUDPAddrPort([]byte(msg), dst)
	}
	if err != nil {
		return netip.AddrPort{}, err
	}
	c.SetReadDeadline(time.Now().Add(timeout))
	buf := make([]byte, 65536)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if err != nil {
			return netip.AddrPort{}, err
		}
		if netip.AddrPortFrom(from.Addr().Unmap(), from.Port()) != dst {
			continue // not the server's answer
		}
		head, body, ok := strings.Cut(string(buf[:n]), " ")
		if !ok || !strings.HasPrefix(head, "peer=") {
			return netip.AddrPort{}, fmt.Errorf("unexpected answer %q", buf[:n])
		}
		if body != msg {
			continue // a late answer to an earlier question on this socket
		}
		return netip.ParseAddrPort(strings.TrimPrefix(head, "peer="))
	}
}

// Ping kinds: a ping socket (SOCK_DGRAM, the identifier is the socket's
// port, chosen by the kernel) or a raw socket (the program picks the
// identifier and matches replies itself).
const (
	PingSocket = "ping socket"
	PingRaw    = "raw"
)

// Ping sends one echo request from the host to dst through a socket of
// kind and waits for the reply. It returns the identifier used.
func (w *World) Ping(dst netip.Addr, kind string, id uint16, timeout time.Duration) (uint16, error) {
	family, proto, req, rep := unix.AF_INET, unix.IPPROTO_ICMP, byte(8), byte(0)
	if dst.Is6() {
		family, proto, req, rep = unix.AF_INET6, unix.IPPROTO_ICMPV6, 128, 129
	}
	typ := unix.SOCK_DGRAM
	if kind == PingRaw {
		typ = unix.SOCK_RAW
	}
	var fd int
	err := w.Host.Do(func() (err error) {
		fd, err = unix.Socket(family, typ|unix.SOCK_CLOEXEC, proto)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("%s socket: %w", kind, err)
	}
	defer unix.Close(fd)
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return 0, err
	}
	var sa unix.Sockaddr = &unix.SockaddrInet6{Addr: dst.As16()}
	if dst.Is4() {
		sa = &unix.SockaddrInet4{Addr: dst.As4()}
	}
	if kind == PingSocket {
		if err := unix.Connect(fd, sa); err != nil {
			return 0, fmt.Errorf("connect ping socket: %w", err)
		}
		local, err := unix.Getsockname(fd)
		if err != nil {
			return 0, err
		}
		switch l := local.(type) {
		case *unix.SockaddrInet4:
			id = uint16(l.Port)
		case *unix.SockaddrInet6:
			id = uint16(l.Port)
		}
	}
	msg := make([]byte, 8+32)
	msg[0] = req
	binary.BigEndian.PutUint16(msg[4:], id)
	binary.BigEndian.PutUint16(msg[6:], 1)
	copy(msg[8:], "rerouted test world echo payload")
	if family == unix.AF_INET && kind == PingRaw {
		// The kernel completes ICMPv6 checksums of raw sockets, not ICMP's.
		var s uint32
		for i := 0; i < len(msg); i += 2 {
			s += uint32(binary.BigEndian.Uint16(msg[i:]))
		}
		for s>>16 != 0 {
			s = s&0xffff + s>>16
		}
		binary.BigEndian.PutUint16(msg[2:], ^uint16(s))
	}
	if err := unix.Sendto(fd, msg, 0, sa); err != nil {
		return id, fmt.Errorf("send echo: %w", err)
	}
	buf := make([]byte, 1500)
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return id, fmt.Errorf("echo reply from %s: %w", dst, err)
		}
		b := buf[:n]
		if family == unix.AF_INET && kind == PingRaw && len(b) > 20 { // a raw IPv4 socket sees the IP header
			b = b[int(b[0]&0x0f)*4:]
		}
		// A ping socket rewrites nothing: the identifier it returns is
		// the one it sent. A raw socket sees every echo: match it.
		if len(b) >= 8 && b[0] == rep && binary.BigEndian.Uint16(b[4:]) == id {
			return id, nil
		}
	}
	return id, fmt.Errorf("echo reply from %s: timed out", dst)
}

// NoChecksum makes c send its IPv4 datagrams without a UDP checksum
// (SO_NO_CHECK), as tunnels often do.
func NoChecksum(c *net.UDPConn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_NO_CHECK, 1) }); err != nil {
		return err
	}
	return serr
}

// NoChecksum makes the server answer without UDP checksums (IPv4).
func (s *UDPServer) NoChecksum() error {
	for _, c := range s.conns {
		if err := NoChecksum(c); err != nil {
			return err
		}
	}
	return nil
}
