package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
)

// runOnce runs `rerouted run` in the host namespace until it exits or
// timeout passes, and returns its output and exit code (-1: still running,
// then killed).
func (e *env) runOnce(cfg string, timeout time.Duration, args ...string) (string, int) {
	e.t.Helper()
	d, err := e.w.StartDaemon(bin, cfg, nil, args...)
	if err != nil {
		e.t.Fatal(err)
	}
	err = d.Wait(timeout)
	var ee *exec.ExitError
	switch {
	case err == nil:
		return d.Output(), 0
	case errors.As(err, &ee):
		return d.Output(), ee.ExitCode()
	}
	d.Kill()
	return d.Output(), -1
}

// A second `rerouted run` in the same network namespace, with the same
// queue number or another, exits 2 at once and touches nothing: the
// first daemon's table, elements and flows go on as they were.
func TestSecondDaemonRefused(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	if _, err := e.w.ServeUDP(53); err != nil {
		t.Fatal(err)
	}
	e.hostMarkDatagrams(53)
	e.start()
	c, err := e.w.Dial(networld.DialOptions{Port: 80})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	if peer, err := networld.Greeting(r); err != nil || peer.Addr() != networld.HostB {
		t.Fatalf("server saw %v, err %v", peer, err)
	}
	dns := netip.AddrPortFrom(networld.ServerAddr, 53)
	u, err := e.w.UDPSocket(dns, true, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	roundTrips := func(n int) int {
		ok := 0
		for i := 0; i < n; i++ {
			if p, err := networld.AskUDP(u, dns, "q", time.Second); err == nil && p.Addr() == networld.HostB {
				ok++
			}
		}
		return ok
	}
	if n := roundTrips(5); n != 5 {
		t.Fatalf("before: %d of 5 UDP round trips via ISP B", n)
	}
	before, err := e.w.Host.Run("nft", "-a", "list", "table", "inet", "rerouted")
	if err != nil {
		t.Fatal(err)
	}

	for _, queue := range []int{0, 5} {
		o := newEnvIn(t, e, "kernel")
		cfg, err := os.ReadFile(o.cfg)
		if err != nil {
			t.Fatal(err)
		}
		cfg = []byte(strings.Replace(string(cfg), "queue = 0", fmt.Sprintf("queue = %d", queue), 1))
		if err := os.WriteFile(o.cfg, cfg, 0o600); err != nil {
			t.Fatal(err)
		}
		out, code := e.runOnce(o.cfg, 10*time.Second)
		if code != 2 || !strings.Contains(out, "another rerouted is running in this network namespace") ||
			!strings.Contains(out, fmt.Sprintf("pid %d", e.d.PID())) {
			t.Errorf("second daemon, queue %d: exit %d:\n%s", queue, code, out)
		}
		if _, err := os.Stat(o.sock); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("second daemon, queue %d, left a control socket: %v", queue, err)
		}
	}

	after, err := e.w.Host.Run("nft", "-a", "list", "table", "inet", "rerouted")
	if err != nil {
		t.Fatal(err)
	}
	// Timeouts of dynamic elements (meters, learned tuples) run down on
	// their own: they are not changes.
	expires := regexp.MustCompile(` expires [0-9hms.]+`)
	before, after = expires.ReplaceAllString(before, ""), expires.ReplaceAllString(after, "")
	if after != before {
		t.Errorf("the first daemon's table changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
	if n := roundTrips(20); n != 20 {
		t.Errorf("after: %d of 20 UDP round trips via ISP B", n)
	}
	if _, err := fmt.Fprint(c, "still here"); err != nil {
		t.Fatal(err)
	}
	c.CloseWrite()
	if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, "10 ") {
		t.Errorf("the translated connection after the second daemons: %q, %v", line, err)
	}
	if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostB {
		t.Errorf("a new connection: server saw %v, err %v", peer, err)
	}
	if strings.Contains(e.d.Output(), "level=ERROR") {
		t.Errorf("the first daemon logged errors:\n%s", e.d.Output())
	}
}

// The control socket in a directory another user owns: that user swaps a
// link to a root file in and out of the socket's path while rerouted
// starts, again and again. rerouted refuses the directory (exit 2) and no
// file outside it changes mode. In a directory of root's, a socket another
// user left at the path is reported and replaced, not obeyed; a stale one
// of root's is replaced.
func TestControlSocketPath(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Fatal("setpriv is missing (util-linux)")
	}
	base := publicDir(t)
	victim := filepath.Join(base, "victim")
	if err := os.WriteFile(victim, []byte("root's\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	userDir := filepath.Join(base, "user")
	if err := os.Mkdir(userDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(userDir, 4321, 4321); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(userDir, "rerouted.sock")
	swapper := exec.Command("setpriv", "--reuid=4321", "--regid=4321", "--clear-groups", "sh", "-c",
		fmt.Sprintf("while :; do ln -sfn %s %s; rm -f %s; done", victim, sock, sock))
	if err := swapper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { swapper.Process.Kill(); swapper.Wait() }()
	cfg := filepath.Join(e.dir, "user.toml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(configHead, sock, "kernel")+webRule), 0o600); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		out, code := e.runOnce(cfg, 10*time.Second)
		if code != 2 || !strings.Contains(out, "owned by uid 4321, not root") {
			t.Fatalf("run %d: exit %d:\n%s", i, code, out)
		}
		st, err := os.Stat(victim)
		if err != nil || st.Mode().Perm() != 0o644 {
			t.Fatalf("run %d: %s now %v, %v", i, victim, st.Mode(), err)
		}
		if strings.Contains(tables(t, e.w.Host), "rerouted") {
			t.Fatalf("run %d left a table", i)
		}
	}
	swapper.Process.Kill()

	// A socket the user bound (while the directory was still theirs, say)
	// and still answers on, in a directory that is root's now.
	rootDir := filepath.Join(base, "root")
	if err := os.Mkdir(rootDir, 0o755); err != nil {
		t.Fatal(err)
	}
	e.sock = filepath.Join(rootDir, "rerouted.sock")
	e.writeConfig(webRule)
	squat, err := net.Listen("unix", e.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer squat.Close()
	if err := os.Chown(e.sock, 4321, 4321); err != nil {
		t.Fatal(err)
	}
	e.start()
	if _, err := e.d.WaitFor("control socket path was taken by another user: removed, not used", time.Second); err != nil {
		t.Error(err)
	}
	if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostB {
		t.Fatalf("server saw %v, err %v", peer, err)
	}
	if flows := e.flows(); flows == nil {
		t.Fatal("no answer from the daemon's own socket")
	}
	st, err := os.Lstat(e.sock)
	if err != nil || st.Sys().(*syscall.Stat_t).Uid != 0 || st.Mode().Perm() != 0o600 {
		t.Errorf("control socket %v, %v", st.Mode(), err)
	}

	// Killed, the daemon leaves its socket: stale, and replaced quietly.
	e.d.Kill()
	e.start()
	if _, err := e.d.WaitFor("replaced a stale control socket", time.Second); err != nil {
		t.Error(err)
	}
	if flows := e.flows(); flows == nil {
		t.Fatal("no answer after replacing the stale socket")
	}
}

// A configuration file loosened after the start (another user may now
// have written it) is refused at the next reload, as it would be at a
// start: the running policy stays.
func TestReloadRefusesInsecureConfig(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	e.start()
	e.writeConfig("") // no rule: port 80 would follow the normal route
	if err := os.Chmod(e.cfg, 0o666); err != nil {
		t.Fatal(err)
	}
	e.d.Signal(syscall.SIGHUP)
	if _, err := e.d.WaitFor("reload rejected; the current policy stays in force", 3*time.Second); err != nil {
		t.Fatal(err)
	}
	if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostB {
		t.Errorf("after the refused reload: server saw %v, err %v", peer, err)
	}
}
