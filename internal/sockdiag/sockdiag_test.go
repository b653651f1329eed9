package sockdiag

import (
	"errors"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/testenv"
)

// pair makes a loopback TCP connection and returns the client's view.
func pair(t *testing.T) (client, server net.Conn, local, remote netip.AddrPort) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err == nil {
			accepted <- c
		}
	}()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	srv := <-accepted
	t.Cleanup(func() { c.Close(); srv.Close() })
	return c, srv, c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort()
}

// openConn opens a sock_diag socket for the test, closed when it ends.
func openConn(t *testing.T) *Conn {
	t.Helper()
	d, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestLookupAndDump(t *testing.T) {
	c, srv, local, remote := pair(t)
	d := openConn(t)

	var s Socket
	if err := lookup(d, ipproto.TCP, local, remote, &s); err != nil {
		t.Fatalf("Lookup(%v, %v): %v", local, remote, err)
	}
	if s.State != StateEstablished || s.Local != local || s.Remote != remote {
		t.Fatalf("socket = %+v (state %s)", s, StateName(s.State))
	}
	if s.UID != uint32(os.Getuid()) || s.Inode == 0 || s.Cookie == 0 {
		t.Fatalf("socket identity = uid %d inode %d cookie %d", s.UID, s.Inode, s.Cookie)
	}

	// A tuple nobody owns: s, filled by the lookup before, tells of no
	// socket (the sweeper's "socket gone" line printed the earlier one's
	// cookie and state).
	unused := netip.AddrPortFrom(local.Addr(), 1)
	if err := lookup(d, ipproto.TCP, unused, remote, &s); err != ErrNotFound {
		t.Fatalf("Lookup(unused) = %v, want ErrNotFound", err)
	}
	if s != (Socket{}) {
		t.Fatalf("after ErrNotFound the socket of an earlier lookup is still there: %+v", s)
	}

	found := 0
	err := d.Dump(unix.AF_INET, ipproto.TCP, func(x *Socket) {
		if x.Local == local && x.Remote == remote {
			found++
		}
	})
	if err != nil || found != 1 {
		t.Fatalf("Dump: err=%v, found our socket %d times", err, found)
	}

	// The side that closes first keeps the tuple in TIME_WAIT, and sock_diag
	// still shows it: flows must outlive the socket's TIME_WAIT.
	c.Close()
	srv.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := lookup(d, ipproto.TCP, local, remote, &s)
		if err == nil && s.State == StateTimeWait {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("client socket never showed TIME_WAIT: err=%v state=%s", err, StateName(s.State))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestLookupAllocatesNothing(t *testing.T) {
	_, _, local, remote := pair(t)
	d := openConn(t)
	var s Socket
	allocs := testing.AllocsPerRun(200, func() {
		if err := lookup(d, ipproto.TCP, local, remote, &s); err != nil {
			panic(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("Lookup allocates %.1f times", allocs)
	}
}

// UDP: the exact lookup finds a connected socket by its tuple, and an
// unconnected one (here wildcard-bound) for any peer, as delivery would.
func TestLookupUDP(t *testing.T) {
	u, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4zero})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	peer := netip.MustParseAddrPort("127.0.0.9:53")
	c, err := net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(peer))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	d := openConn(t)

	var s Socket
	local := c.LocalAddr().(*net.UDPAddr).AddrPort()
	if err := lookup(d, ipproto.UDP, local, peer, &s); err != nil || s.Local != local || s.Remote != peer {
		t.Fatalf("connected: Lookup(%v, %v) = %+v, %v", local, peer, s, err)
	}
	connected := s.Cookie
	if err := lookup(d, ipproto.UDP, local, netip.MustParseAddrPort("127.0.0.9:54"), &s); err != ErrNotFound {
		t.Fatalf("connected socket, another peer: %+v, %v; want ErrNotFound", s, err)
	}
	wild := netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), u.LocalAddr().(*net.UDPAddr).AddrPort().Port())
	if err := lookup(d, ipproto.UDP, wild, netip.MustParseAddrPort("127.0.0.7:999"), &s); err != nil || s.Local.Port() != wild.Port() || s.Cookie == connected {
		t.Fatalf("unconnected: Lookup(%v) = %+v, %v", wild, s, err)
	}
}

// Destroy resets a socket through an acknowledged request; a second try
// finds it gone.
func TestDestroy(t *testing.T) {
	c, _, local, remote := pair(t)
	d := openConn(t)
	var s Socket
	if err := lookup(d, ipproto.TCP, local, remote, &s); err != nil {
		t.Fatal(err)
	}
	switch err := d.Destroy(ipproto.TCP, local, remote, s.Cookie); {
	case errors.Is(err, unix.EPERM) && os.Geteuid() != 0:
		testenv.Skip(t, "destroying a socket needs root: %v", err)
	case errors.Is(err, unix.EOPNOTSUPP):
		testenv.Skip(t, "the kernel has no SOCK_DESTROY (CONFIG_INET_DIAG_DESTROY): %v", err)
	case err != nil:
		t.Fatal(err)
	}
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, unix.ECONNABORTED) {
		t.Fatalf("read from a destroyed socket: %v, want ECONNABORTED", err)
	}
	if err := d.Destroy(ipproto.TCP, local, remote, s.Cookie); err != ErrNotFound {
		t.Fatalf("destroyed twice: %v, want ErrNotFound", err)
	}
}

// BenchmarkLookup is the exact lookup a new flow's first packet costs.
// Informational: its time is compared to nothing; the floor is
// TestLookupAllocatesNothing.
func BenchmarkLookup(b *testing.B) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		if c, err := ln.Accept(); err == nil {
			defer c.Close()
			c.Read(make([]byte, 1))
		}
	}()
	c, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	local, remote := c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort()
	d, err := Open()
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	var s Socket
	b.ReportAllocs()
	for b.Loop() {
		if err := lookup(d, ipproto.TCP, local, remote, &s); err != nil {
			b.Fatal(err)
		}
	}
}

// lookup is Lookup into s.
func lookup(d *Conn, proto ipproto.Proto, local, remote netip.AddrPort, s *Socket) error {
	var err error
	*s, err = d.Lookup(proto, local, remote)
	return err
}

// A socket closed while its peer's side is still open is orphaned in
// FIN_WAIT2, which Linux keeps as a timewait socket (substate FIN_WAIT2)
// in the established hash: the exact lookup and the dump both find it, as
// they find TIME_WAIT. The sweeper relies on it: such a socket still owns
// its tuple and sends the last ACK.
func TestLookupFindsOrphanedFinWait2(t *testing.T) {
	c, _, local, remote := pair(t) // the server's side stays open
	d := openConn(t)
	c.Close()
	const finWait2 = 5
	var s Socket
	deadline := time.Now().Add(5 * time.Second)
	for {
		err := lookup(d, ipproto.TCP, local, remote, &s)
		if err == nil && s.State == finWait2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the orphaned client socket: err=%v state=%s, want FIN_WAIT2", err, StateName(s.State))
		}
		time.Sleep(10 * time.Millisecond)
	}
	found := 0
	if err := d.Dump(unix.AF_INET, ipproto.TCP, func(x *Socket) {
		if x.Local == local && x.Remote == remote && x.State == finWait2 {
			found++
		}
	}); err != nil || found != 1 {
		t.Fatalf("Dump: err=%v, found the orphaned FIN_WAIT2 socket %d times", err, found)
	}
}

// A TCP socket's end is announced to a Polled subscription with its
// tuple and cookie: Wait returns once it is queued, Drain reads it, Stop
// ends a Wait, and nothing allocates.
func TestPollTCPDestroyed(t *testing.T) {
	p, err := PollTCPDestroyed()
	if errors.Is(err, unix.EPERM) && os.Geteuid() != 0 {
		testenv.Skip(t, "subscribing to socket ends needs CAP_NET_ADMIN: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	c, srv, local, remote := pair(t)
	d := openConn(t)
	var s Socket
	if err := lookup(d, ipproto.TCP, local, remote, &s); err != nil {
		t.Fatal(err)
	}
	srv.Close() // the server closes first: the client's socket leaves no TIME_WAIT
	c.Read(make([]byte, 1))
	c.Close()
	var got *Socket
	// Wait blocks for as long as nothing comes: a Stop after 5 s is the
	// test's deadline.
	deadline := time.AfterFunc(5*time.Second, func() { p.Stop() })
	for got == nil {
		queued, err := p.Wait()
		if err != nil {
			t.Fatal(err)
		}
		if !queued {
			break
		}
		if err := p.Drain(func(a *Socket) {
			if a.Cookie == s.Cookie {
				cp := *a
				got = &cp
			}
		}); err != nil {
			t.Fatal(err)
		}
	}
	deadline.Stop()
	if got == nil {
		t.Fatal("the client socket's end was not announced within 5 s")
	}
	if got.Local != local || got.Remote != remote {
		t.Errorf("announced %v -> %v, want %v -> %v", got.Local, got.Remote, local, remote)
	}
	if allocs := testing.AllocsPerRun(100, func() { _ = p.Drain(func(*Socket) {}) }); allocs != 0 {
		t.Errorf("Drain allocates %v times", allocs)
	}

	// Stop ends a blocked Wait, and every later one.
	waited := make(chan bool)
	go func() { queued, _ := p.Wait(); waited <- queued }()
	time.Sleep(50 * time.Millisecond)
	if err := p.Stop(); err != nil {
		t.Fatal(err)
	}
	select {
	case queued := <-waited:
		if queued {
			t.Error("a stopped Wait says an announcement is queued")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Stop did not end a blocked Wait")
	}
	if allocs := testing.AllocsPerRun(100, func() { _, _ = p.Wait() }); allocs != 0 {
		t.Errorf("Wait allocates %v times", allocs)
	}
}
