package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/owner"
)

// program installs the test client under a name, as a separate application.
func program(t *testing.T, dir, name string) string {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(client)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, name)
	if err := os.WriteFile(p, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

type runOpts struct {
	uid      int // run as this uid and gid (0: root)
	cgroupFD int // start inside this cgroup (0: none)
	// retrans, if set, adds what the kernel sent again of an upload
	// (runClient).
	retrans *atomic.Uint64
}

// connect runs a client program on the host and returns the address the
// server saw.
func (e *env) connect(prog string, port uint16, o runOpts) netip.AddrPort {
	e.t.Helper()
	args := []string{"--net=/run/netns/" + e.w.Host.Name}
	if o.uid != 0 {
		args = append(args, "--setuid", strconv.Itoa(o.uid), "--setgid", strconv.Itoa(o.uid))
	}
	args = append(args, "--", prog, "-connect", fmt.Sprintf("%s:%d", networld.ServerAddr, port))
	cmd := exec.Command("nsenter", args...)
	if o.cgroupFD != 0 {
		cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: o.cgroupFD}
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		e.t.Fatalf("%s: %v: %s", filepath.Base(prog), err, out)
	}
	f := strings.Fields(string(out))
	if len(f) == 0 || !strings.HasPrefix(f[0], "peer=") {
		e.t.Fatalf("%s printed %q", filepath.Base(prog), out)
	}
	ap, err := netip.ParseAddrPort(strings.TrimPrefix(f[0], "peer="))
	if err != nil {
		e.t.Fatal(err)
	}
	return ap
}

// testCgroup creates a cgroup v2 directory for the test and removes it at
// the end; it returns its path below the mount and an open fd.
func testCgroup(t *testing.T) (string, int) {
	t.Helper()
	root, err := owner.Cgroup2Mount("/proc/self/mountinfo")
	if err != nil {
		t.Fatalf("no cgroup v2 hierarchy: %v", err)
	}
	rel := fmt.Sprintf("rerouted-e2e-%d-%d", os.Getpid(), time.Now().UnixNano())
	dir := filepath.Join(root, rel)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.Close()
		if err := os.Remove(dir); err != nil {
			t.Errorf("remove cgroup %s: %v", dir, err)
		}
	})
	return rel, int(f.Fd())
}

// Who owns the socket decides the uplink: process name, exe path, uid and
// cgroup, first match wins, and uplink = "default" pins the normal route.
func TestOwnerDecidesUplink(t *testing.T) {
	policyEngines(t, func(t *testing.T, dp, steering string) {
		// Not t.TempDir(): its parent is private, and the uid test's client must
		// be able to run the programs.
		bins, err := os.MkdirTemp("", "rerouted-e2e-bins-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(bins) })
		os.Chmod(bins, 0o755)
		cgroup, cgfd := testCgroup(t)
		exact := filepath.Join(bins, "bin2", "app-exe")
		rules := fmt.Sprintf(`
	[[rule]]
	name = "pinned app"
	uplink = "default"
	process = "app-pinned"

	[[rule]]
	name = "app b"
	uplink = "isp-b"
	process = ["app-x", "app-b"]

	[[rule]]
	name = "exact exe"
	uplink = "isp-b"
	exe = %q

	[[rule]]
	name = "by uid"
	uplink = "isp-b"
	dport = 80
	uid = 4321

	[[rule]]
	name = "by cgroup"
	uplink = "isp-b"
	cgroup = %q

	[[rule]]
	name = "all 8080"
	uplink = "isp-b"
	dport = 8080
	`, exact, "/"+cgroup+"/")
		e := newEnvSteering(t, dp, steering, rules)
		e.start()
		steered := e.steers()
		plain := program(t, filepath.Join(bins, "bin1"), "app-plain")
		cases := []struct {
			name string
			prog string
			port uint16
			o    runOpts
			want netip.Addr
			rule string
		}{
			{"process rule", program(t, filepath.Join(bins, "bin1"), "app-b"), 80, runOpts{}, networld.HostB, "app b"},
			{"another program, same destination", plain, 80, runOpts{}, networld.HostA, ""},
			{"exe rule", program(t, filepath.Join(bins, "bin2"), "app-exe"), 80, runOpts{}, networld.HostB, "exact exe"},
			{"same name, other path", program(t, filepath.Join(bins, "bin1"), "app-exe"), 80, runOpts{}, networld.HostA, ""},
			{"uid rule", plain, 80, runOpts{uid: 4321}, networld.HostB, "by uid"},
			{"cgroup rule", plain, 80, runOpts{cgroupFD: cgfd}, networld.HostB, "by cgroup"},
			{"first match wins: pinned", program(t, filepath.Join(bins, "bin1"), "app-pinned"), 8080, runOpts{}, networld.HostA, ""},
			{"later rule for others", plain, 8080, runOpts{}, networld.HostB, "all 8080"},
		}
		for _, c := range cases {
			peer := e.connect(c.prog, c.port, c.o)
			if peer.Addr() != c.want {
				t.Errorf("%s: server saw %v, want %v", c.name, peer, c.want)
				continue
			}
			if c.rule == "" {
				continue
			}
			// The debug line names the process, its exe, its cgroup and the rule.
			var line string
			if steered {
				// The first rule names a process: a comm it does not list
				// may still be an executable's name it does, so the kernel
				// leaves every other program's socket to the queue ([NEW]),
				// and a bind ([BIND]: uid, pid, comm and rule) can only be
				// app-pinned's. The verdicts are what must agree.
				line, err = e.d.WaitFor(fmt.Sprintf("rule=%q", c.rule), 2*time.Second)
				if strings.HasPrefix(line, "[BIND] ") {
					if !strings.Contains(line, fmt.Sprintf(" dport=%d => src=%v uplink=isp-b uid=%d pid=", c.port, networld.HostB, c.o.uid)) ||
						!strings.Contains(line, fmt.Sprintf(`comm=%q`, filepath.Base(c.prog))) {
						t.Errorf("%s: bind line %q lacks the destination, source, uid or comm", c.name, line)
					}
					continue
				}
			} else {
				line, err = e.d.WaitFor(fmt.Sprintf("sport=%d dev=hb ", peer.Port()), 2*time.Second)
			}
			if err != nil {
				t.Errorf("%s: %v", c.name, err)
				continue
			}
			wantParts := []string{fmt.Sprintf("uid=%d ", c.o.uid), fmt.Sprintf(`comm=%q`, filepath.Base(c.prog)),
				"exe=" + c.prog + " ", fmt.Sprintf("rule=%q", c.rule)}
			if c.o.cgroupFD != 0 {
				wantParts = append(wantParts, "cgroup=/"+cgroup+" ")
			}
			for _, w := range wantParts {
				if !strings.Contains(line, w) {
					t.Errorf("%s: debug line %q lacks %q", c.name, line, w)
				}
			}
		}
	})
}

// SIGHUP: a valid file changes new flows and leaves open ones alone; a
// broken file is rejected with FILE:LINE:COL and the policy stays. On the
// connect engine too: the kernel's rules change with the file, and a socket
// bound before the reload stays bound.
func TestSIGHUPReload(t *testing.T) {
	policyEngines(t, func(t *testing.T, dp, steering string) {
		e := newEnvSteering(t, dp, steering, webRule)
		d := e.start()
		open, err := e.w.Dial(networld.DialOptions{Port: 80})
		if err != nil {
			t.Fatal(err)
		}
		defer open.Close()
		if local := open.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Unmap(); e.steers() && local != networld.HostB {
			t.Fatalf("steered at connect(), the socket is on %v, want ISP B's address", local)
		}

		e.writeConfig(strings.Replace(webRule, `uplink = "isp-b"`, `uplink = "default"`, 1))
		d.Signal(syscall.SIGHUP)
		if _, err := d.WaitFor("msg=reloaded", 5*time.Second); err != nil {
			t.Fatal(err)
		}
		if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostA {
			t.Fatalf("after reload to default: peer %v err %v", peer, err)
		}
		// The connection opened before the reload keeps its translation.
		peer, n, err := networld.Exchange(open, 1<<20)
		if err != nil || n != 1<<20 || peer.Addr() != networld.HostB {
			t.Fatalf("open flow after reload: peer %v, %d bytes, err %v", peer, n, err)
		}

		e.writeConfig("\n[[rule]]\nuplink = \"isp-b\"\ndport = 0\n")
		d.Signal(syscall.SIGHUP)
		if _, err := d.WaitFor("reload rejected", 5*time.Second); err != nil {
			t.Fatal(err)
		}
		line := strings.Count(fmt.Sprintf(configHead, e.sock, e.dp), "\n") + 4 // the rule's dport line
		if _, err := d.WaitFor(fmt.Sprintf("%s:%d:1: port 0 is outside 1-65535", e.cfg, line), time.Second); err != nil {
			t.Error(err)
		}
		if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostA {
			t.Fatalf("after a rejected reload the last good policy must stay: peer %v err %v", peer, err)
		}
	})
}
