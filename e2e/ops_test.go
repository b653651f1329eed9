package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"syscall"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// publicDir is a directory every user may enter, removed at the end.
func publicDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "rerouted-e2e-public-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// The control socket answers root only: its file mode is 0600, and even if
// someone widens it, the daemon checks the peer's credentials.
func TestControlSocketRefusesNonRoot(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	pub := publicDir(t)
	e.sock, e.cfg = filepath.Join(pub, "ctl.sock"), filepath.Join(pub, "rerouted.toml")
	e.writeConfig(webRule)
	os.Chmod(e.cfg, 0o644)
	e.start()
	if fi, err := os.Stat(e.sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket mode %v, err %v; want 0600", fi.Mode(), err)
	}
	prog := filepath.Join(pub, "rerouted")
	if b, err := os.ReadFile(bin); err != nil || os.WriteFile(prog, b, 0o755) != nil {
		t.Fatalf("copy the binary: %v", err)
	}
	// The socket's mode keeps the user out: the user is told root is
	// needed, not asked whether rerouted runs.
	out, err := exec.Command("setpriv", "--reuid", "4321", "--regid", "4321", "--clear-groups", "--",
		prog, "flows", "--config", e.cfg).CombinedOutput()
	if err == nil || !strings.Contains(string(out), e.sock+": permission denied: the control socket answers root only (run it as root") ||
		strings.Contains(string(out), "is rerouted running") {
		t.Errorf("uid 4321, socket mode 0600: rerouted flows printed %q, err %v; want root is needed", out, err)
	}
	if err := os.Chmod(e.sock, 0o666); err != nil { // an operator's mistake
		t.Fatal(err)
	}
	out, err = exec.Command("setpriv", "--reuid", "4321", "--regid", "4321", "--clear-groups", "--",
		prog, "flows", "--config", e.cfg).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "permission denied: the control socket answers root only") {
		t.Fatalf("uid 4321: rerouted flows printed %q, err %v; want a refusal", out, err)
	}
	if _, err := e.d.WaitFor("control socket: refused a client that is not root", 0); err != nil {
		t.Error(err)
	}
	if got := e.flows(); got == nil { // root still gets an answer
		t.Fatal("root's listing failed")
	}
}

// Under systemd (Type=notify) the daemon says READY=1 once its table is
// installed and its queues bound, and STOPPING=1 when it starts removing
// them; its log lines carry syslog priorities for the journal, and no time
// of their own.
func TestSystemdNotifyAndJournal(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	path := filepath.Join(publicDir(t), "notify")
	l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	next := func() string {
		t.Helper()
		l.SetReadDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 4096)
		n, err := l.Read(buf)
		if err != nil {
			t.Fatalf("no notification: %v", err)
		}
		return string(buf[:n])
	}
	d, err := e.w.StartDaemonEnv(bin, e.cfg, []string{"NOTIFY_SOCKET=" + path, "JOURNAL_STREAM=8:12345"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Kill()
	if got := next(); got != "READY=1" {
		t.Fatalf("first notification %q, want READY=1", got)
	}
	// Ready means translated: the table is there and a marked
	// connection is translated at once.
	if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostB {
		t.Fatalf("right after READY=1: server saw %v, err %v", peer, err)
	}
	d.Signal(syscall.SIGHUP)
	if got := next(); !strings.HasPrefix(got, "RELOADING=1\nMONOTONIC_USEC=") {
		t.Errorf("on SIGHUP: %q, want RELOADING=1 with MONOTONIC_USEC", got)
	}
	if got := next(); got != "READY=1" {
		t.Errorf("after the reload: %q, want READY=1", got)
	}
	d.Signal(syscall.SIGTERM)
	if got := next(); got != "STOPPING=1" {
		t.Errorf("on SIGTERM: %q, want STOPPING=1", got)
	}
	if err := d.Wait(10 * time.Second); err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(d.Output(), "\n") {
		if !regexp.MustCompile(`^<[3467]>level=`).MatchString(line) || strings.Contains(line, "time=") {
			t.Errorf("log line not for the journal: %q", line)
		}
	}
	if !strings.Contains(d.Output(), "<6>level=INFO msg=ready") {
		t.Errorf("no ready line with priority 6:\n%s", d.Output())
	}
}

// Prometheus metrics on metrics_listen: flows by uplink and protocol,
// decisions by rule, the decision latency histogram, the kernel's queue
// counters, errors by kind, and the Go runtime's.
func TestMetrics(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	cfg := strings.Replace(fmt.Sprintf(configHead, e.sock, e.dp), "[daemon]\n", "[daemon]\nmetrics_listen = \"127.0.0.1:9477\"\n", 1)
	if err := os.WriteFile(e.cfg, []byte(cfg+webRule), 0o600); err != nil {
		t.Fatal(err)
	}
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
	if _, err := e.w.Fetch(8080, 3*time.Second); err != nil { // no rule: the normal route
		t.Fatal(err)
	}
	dns := netip.AddrPortFrom(networld.ServerAddr, 53)
	u, err := e.w.UDPSocket(dns, true, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if _, err := networld.AskUDP(u, dns, "q", 2*time.Second); err != nil {
		t.Fatal(err)
	}

	// The kernel's decision is learned within its log's batch (10 ms).
	eventually(t, time.Second, "the kernel's decision learned", func() bool {
		return strings.Contains(e.metrics(), `rerouted_flows_total{decided_by="kernel"} 1`)
	})
	body := e.metrics()
	for _, want := range []string{
		`rerouted_flows{proto="tcp",uplink="isp-b"} 1`,
		`rerouted_flows{proto="udp",uplink="isp-b"} 1`,
		`rerouted_decisions_total{rule="web"} 1`,
		// The host-marked datagram flow was the kernel's to decide,
		// and the connection no rule concerns never reached the daemon
		// (the kernel's prefilter): one decision by the daemon.
		`rerouted_decision_seconds_count 1`,
		`rerouted_queue_drops_total{queue="0",reason="queue_full"} 0`,
		`rerouted_errors_total{kind="install"} 0`,
		`rerouted_translated_total 1`,
		`rerouted_flows_total{decided_by="daemon"} 1`,
		`rerouted_flows_total{decided_by="kernel"} 1`,
		"go_goroutines ",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if strings.Contains(body, `rerouted_decisions_total{rule="none"}`) {
		t.Error("a connection no rule concerns was decided by the daemon")
	}
	if t.Failed() {
		t.Logf("metrics:\n%s", body)
	}
}
