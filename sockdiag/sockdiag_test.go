package sockdiag

import (
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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

func TestLookupAndDump(t *testing.T) {
	c, srv, local, remote := pair(t)
	d, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()

	var s Socket
	if err := d.Lookup(unix.IPPROTO_TCP, local, remote, &s); err != nil {
		t.Fatalf("Lookup(%v, %v): %v", local, remote, err)
	}
	if s.State != StateEstablished || s.Local != local || s.Remote != remote {
		t.Fatalf("socket = %+v (state %s)", s, StateName(s.State))
	}
	if s.UID != uint32(os.Getuid()) || s.Inode == 0 || s.Cookie == 0 {
		t.Fatalf("socket identity = uid %d inode %d cookie %d", s.UID, s.Inode, s.Cookie)
	}

	// A tuple nobody owns.
	unused := netip.AddrPortFrom(local.Addr(), 1)
	if err := d.Lookup(unix.IPPROTO_TCP, unused, remote, &s); err != ErrNotFound {
		t.Fatalf("Lookup(unused) = %v, want ErrNotFound", err)
	}

	found := 0
	err = d.Dump(unix.AF_INET, unix.IPPROTO_TCP, func(x *Socket) {
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
		err := d.Lookup(unix.IPPROTO_TCP, local, remote, &s)
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
	d, err := Open()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var s Socket
	allocs := testing.AllocsPerRun(200, func() {
		if err := d.Lookup(unix.IPPROTO_TCP, local, remote, &s); err != nil {
			panic(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("Lookup allocates %.1f times", allocs)
	}
}
