package owner

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/testenv"
)

// pair returns the addresses of a connected loopback TCP socket of this
// process.
func pair(t *testing.T) (local, remote netip.AddrPort) {
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
	return c.LocalAddr().(*net.TCPAddr).AddrPort(), c.RemoteAddr().(*net.TCPAddr).AddrPort()
}

func TestOwnerOfOwnSocket(t *testing.T) {
	local, remote := pair(t)
	d, err := sockdiag.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	s, err := d.Lookup(ipproto.TCP, local, remote)
	if err != nil {
		t.Fatal(err)
	}
	o := NewOwners()
	p, ok := o.Process(s.Inode, s.UID, s.CgroupID)
	if !ok || p.PID != os.Getpid() {
		t.Fatalf("Process = %+v, %v; want pid %d", p, ok, os.Getpid())
	}
	exe, _ := os.Executable()
	if p.Exe != exe || p.Comm == "" {
		t.Fatalf("Process = %+v; want exe %s", p, exe)
	}
	// Second lookup comes from the caches and gives the same answer.
	if p2, ok := o.Process(s.Inode, s.UID, s.CgroupID); !ok || p2 != p {
		t.Fatalf("cached lookup = %+v, %v", p2, ok)
	}
	if _, ok := o.Process(s.Inode+1e6, s.UID, s.CgroupID); ok {
		t.Fatal("found a process for an inode nobody holds")
	}
	if o.CgroupRoot == "" {
		testenv.Skip(t, "no cgroup v2 on this machine")
	}
	if s.CgroupID == 0 {
		t.Fatal("sock_diag reported no cgroup id")
	}
	want, err := CgroupOfPID(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := o.Cgroup(s.CgroupID); !ok || got != want {
		t.Fatalf("Cgroup(%d) = %q, %v; want %q (from /proc/self/cgroup)", s.CgroupID, got, ok, want)
	}
}

func TestCgroup2MountOnHybridHost(t *testing.T) {
	f := filepath.Join(t.TempDir(), "mountinfo")
	hybrid := `25 1 0:23 / /sys rw,nosuid - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
32 30 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
`
	os.WriteFile(f, []byte(hybrid), 0o600)
	if got, err := Cgroup2Mount(f); err != nil || got != "/sys/fs/cgroup/unified" {
		t.Fatalf("Cgroup2Mount = %q, %v", got, err)
	}
	os.WriteFile(f, []byte("31 30 0:27 / /my\\040cgroups rw - cgroup2 cgroup2 rw\n"), 0o600)
	if got, _ := Cgroup2Mount(f); got != "/my cgroups" {
		t.Fatalf("escaped mount point = %q", got)
	}
	os.WriteFile(f, []byte("32 30 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"), 0o600)
	if _, err := Cgroup2Mount(f); err == nil {
		t.Fatal("found a cgroup2 mount on a v1-only host")
	}
}

func TestHasRawSocket(t *testing.T) {
	dir := t.TempDir()
	raw := `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
    1: 00000000:0001 00000000:0000 07 00000000:00000000 00:00000000 00000000  1000        0 1 2 0000000000000000 0
    6: 00000000:0006 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 3 2 0000000000000000 0
`
	raw6 := `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  255: 00000000000000000000000000000000:00FF 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000  4321        0 4 2 0000000000000000 0
`
	os.WriteFile(filepath.Join(dir, "raw"), []byte(raw), 0o644)
	os.WriteFile(filepath.Join(dir, "raw6"), []byte(raw6), 0o644)
	for _, c := range []struct {
		v6   bool
		uid  uint32
		want bool
	}{{false, 0, true}, {false, 1000, false}, {true, 4321, true}, {true, 0, false}} {
		got, err := HasRawSocket(dir, c.v6, c.uid)
		if err != nil || got != c.want {
			t.Errorf("v6 %v uid %d: %v, %v; want %v", c.v6, c.uid, got, err, c.want)
		}
	}
}
