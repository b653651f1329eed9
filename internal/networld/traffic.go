package networld

import (
	"bufio"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Server is a TCP server on the internet that tells each client the address
// it saw, then reads what the client sends until EOF and reports the count
// and SHA-256 of the bytes it received.
type Server struct {
	Addr netip.AddrPort // IPv4; the same port also listens on Server6
	lns  []net.Listener

	mu    sync.Mutex
	peers []netip.AddrPort
	mss   []int // TCP_MAXSEG of each accepted connection
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

// Serve starts (or returns the running) server on ServerAddr:port.
func (w *World) Serve(port uint16) (*Server, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if s, ok := w.servers[port]; ok {
		return s, nil
	}
	s := &Server{Addr: netip.AddrPortFrom(ServerAddr, port), conns: map[net.Conn]struct{}{}}
	for _, a := range []netip.AddrPort{s.Addr, netip.AddrPortFrom(Server6, port)} {
		err := w.Net.Do(func() error {
			ln, err := net.Listen("tcp", a.String())
			if err == nil {
				s.lns = append(s.lns, ln)
			}
			return err
		})
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("listen %s in %s: %w", a, w.Net.Name, err)
		}
		s.wg.Add(1)
		go s.accept(s.lns[len(s.lns)-1])
	}
	w.servers[port] = s
	return s, nil
}

func (s *Server) accept(ln net.Listener) {
	defer s.wg.Done()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		peer := c.RemoteAddr().(*net.TCPAddr).AddrPort()
		mss := maxSeg(c.(*net.TCPConn))
		s.mu.Lock()
		s.peers = append(s.peers, peer)
		s.mss = append(s.mss, mss)
		s.conns[c] = struct{}{}
		s.mu.Unlock()
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			defer func() {
				c.Close()
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
			}()
			c.SetDeadline(time.Now().Add(60 * time.Second))
			if _, err := fmt.Fprintf(c, "%s\n", peer); err != nil {
				return
			}
			h := sha256.New()
			n, _ := io.Copy(h, c)
			fmt.Fprintf(c, "%d %x\n", n, h.Sum(nil))
		}()
	}
}

// Peers returns the client address of every connection accepted so far.
func (s *Server) Peers() []netip.AddrPort {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]netip.AddrPort(nil), s.peers...)
}

// MSS returns the TCP_MAXSEG of every connection accepted so far: at most
// what the client's SYN announced.
func (s *Server) MSS() []int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int(nil), s.mss...)
}

func maxSeg(c *net.TCPConn) int {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1
	}
	mss := -1
	rc.Control(func(fd uintptr) { mss, _ = unix.GetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_MAXSEG) })
	return mss
}

// Close stops the server and closes the connections still open.
func (s *Server) Close() {
	for _, ln := range s.lns {
		ln.Close()
	}
	s.mu.Lock()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}

// DialOptions describe a client connection from the host.
type DialOptions struct {
	Dst      netip.Addr    // server address; default ServerAddr (use Server6 for IPv6)
	Port     uint16        // server port
	Bind     netip.Addr    // source address; zero lets routing choose
	BindPort uint16        // source port; zero lets the kernel choose
	Mark     uint32        // SO_MARK set by the socket itself before connect
	Timeout  time.Duration // connect timeout; default 3s
}

// Dial connects from the host to ServerAddr:Port.
func (w *World) Dial(o DialOptions) (*net.TCPConn, error) {
	if o.Timeout == 0 {
		o.Timeout = 3 * time.Second
	}
	d := net.Dialer{Timeout: o.Timeout}
	if o.Bind.IsValid() || o.BindPort != 0 {
		d.LocalAddr = &net.TCPAddr{IP: o.Bind.AsSlice(), Port: int(o.BindPort)}
	}
	if o.Mark != 0 {
		d.Control = func(_, _ string, rc syscall.RawConn) error {
			var serr error
			err := rc.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(o.Mark)) })
			if err != nil {
				return err
			}
			return serr
		}
	}
	dst := o.Dst
	if !dst.IsValid() {
		dst = ServerAddr
	}
	var c net.Conn
	err := w.Host.Do(func() (err error) {
		c, err = d.DialContext(context.Background(), "tcp", netip.AddrPortFrom(dst, o.Port).String())
		return err
	})
	if err != nil {
		return nil, err
	}
	return c.(*net.TCPConn), nil
}

// Greeting reads the server's first line: the client address it saw.
func Greeting(r *bufio.Reader) (netip.AddrPort, error) {
	line, err := r.ReadString('\n')
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("read greeting: %w", err)
	}
	return netip.ParseAddrPort(strings.TrimSpace(line))
}

// Exchange runs one conversation on c: read the address the server saw,
// send n bytes, half-close, and read how many bytes the server received. It
// fails if the server did not receive exactly the bytes sent (SHA-256). The
// client closes first, so its socket ends in TIME_WAIT.
func Exchange(c *net.TCPConn, n int64) (peer netip.AddrPort, received int64, err error) {
	c.SetDeadline(time.Now().Add(60 * time.Second))
	r := bufio.NewReader(c)
	if peer, err = Greeting(r); err != nil {
		return peer, 0, err
	}
	sent := sha256.New()
	if _, err = io.CopyN(c, io.TeeReader(pattern{}, sent), n); err != nil {
		return peer, 0, fmt.Errorf("send: %w", err)
	}
	if err = c.CloseWrite(); err != nil {
		return peer, 0, err
	}
	line, err := r.ReadString('\n')
	if err != nil {
		return peer, 0, fmt.Errorf("read count: %w", err)
	}
	count, sum, _ := strings.Cut(strings.TrimSpace(line), " ")
	if received, err = strconv.ParseInt(count, 10, 64); err != nil {
		return peer, 0, err
	}
	if want := fmt.Sprintf("%x", sent.Sum(nil)); sum != want {
		return peer, received, fmt.Errorf("the server received %d bytes that differ from the %d sent (SHA-256 %s, sent %s)", received, n, sum, want)
	}
	return peer, received, nil
}

// Fetch makes one complete connection to port and returns the client address
// the server saw.
func (w *World) Fetch(port uint16, timeout time.Duration) (netip.AddrPort, error) {
	return w.FetchFrom(DialOptions{Port: port, Timeout: timeout})
}

// FetchFrom is Fetch with all dial options.
func (w *World) FetchFrom(o DialOptions) (netip.AddrPort, error) {
	c, err := w.Dial(o)
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer c.Close()
	peer, _, err := Exchange(c, 0)
	return peer, err
}

// Abort connects to port, reads the greeting and resets the connection
// (SO_LINGER 0): the client socket is gone at once, with no TIME_WAIT.
func (w *World) Abort(port uint16, timeout time.Duration) (netip.AddrPort, error) {
	c, err := w.Dial(DialOptions{Port: port, Timeout: timeout})
	if err != nil {
		return netip.AddrPort{}, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	peer, err := Greeting(bufio.NewReader(c))
	if err != nil {
		return peer, err
	}
	return peer, c.SetLinger(0)
}

// pattern is an endless reader of varied bytes.
type pattern struct{}

var patternSeq atomic.Uint64

func (pattern) Read(p []byte) (int, error) {
	x := patternSeq.Add(1)
	for i := range p {
		x = x*6364136223846793005 + 1442695040888963407
		p[i] = byte(x >> 56)
	}
	return len(p), nil
}

// ServeDownload starts a server on port that reads a byte count N and a
// seed from the client ("N SEED\n"), sends Stream(SEED) for N bytes, and
// closes.
func (w *World) ServeDownload(port uint16) (*Listener, error) {
	return w.ServeFunc(port, func(c net.Conn) {
		var n int64
		var seed uint64
		if _, err := fmt.Fscanf(c, "%d %d\n", &n, &seed); err != nil {
			return
		}
		io.CopyN(c, Stream(seed), n)
	})
}

// Stream returns a deterministic endless byte stream.
func Stream(seed uint64) io.Reader { return &stream{x: seed} }

type stream struct{ x uint64 }

func (s *stream) Read(p []byte) (int, error) {
	for i := range p {
		s.x = s.x*6364136223846793005 + 1442695040888963407
		p[i] = byte(s.x >> 56)
	}
	return len(p), nil
}

// Listener is a bare server of the internet namespace for benchmarks.
type Listener struct {
	ln net.Listener
	wg sync.WaitGroup
}

// ServeFunc starts a server on ServerAddr:port that runs handle for each
// connection. Close it when done.
func (w *World) ServeFunc(port uint16, handle func(net.Conn)) (*Listener, error) {
	l := &Listener{}
	err := w.Net.Do(func() (err error) {
		l.ln, err = net.Listen("tcp", netip.AddrPortFrom(ServerAddr, port).String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen on port %d in %s: %w", port, w.Net.Name, err)
	}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for {
			c, err := l.ln.Accept()
			if err != nil {
				return
			}
			l.wg.Add(1)
			go func() { defer l.wg.Done(); defer c.Close(); handle(c) }()
		}
	}()
	return l, nil
}

// Close stops the listener and waits for its connections to end.
func (l *Listener) Close() {
	l.ln.Close()
	l.wg.Wait()
}

// HoldMany opens n connections over addrs in turn, writes "open N" to out,
// and keeps them until in reaches EOF. It is the client side of scale
// measurements: one process may hold only so many sockets.
func HoldMany(addrs []string, n int, timeout time.Duration, in io.Reader, out io.Writer) error {
	conns := make([]net.Conn, 0, n)
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for i := 0; i < n; i++ {
		c, err := net.DialTimeout("tcp", addrs[i%len(addrs)], timeout)
		if err != nil {
			return fmt.Errorf("connection %d: %w", i, err)
		}
		conns = append(conns, c)
	}
	fmt.Fprintf(out, "open %d\n", len(conns))
	io.Copy(io.Discard, in)
	return nil
}
