// Package e2e runs the real rerouted binary in a namespace world and checks
// what reached the wire: the address servers saw, the ISPs' drop counters,
// the host firewall's invalid counters, conntrack and nftables state.
package e2e

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/control"
	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
	"github.com/rerouted/rerouted/internal/testenv"
)

// BinEnv names a directory holding rerouted, rerouted-lab and worldclient already built;
// without it TestMain builds them (with the tests' -race, if any).
const BinEnv = "REROUTED_E2E_BIN"

var (
	bin        string   // the rerouted binary under test
	lab        string   // rerouted-lab (demo, bench), beside bin: it runs that rerouted
	client     string   // the test world's client program (internal/networld/cmd/worldclient)
	buildFlags []string // -race when the tests run under the race detector
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "rerouted-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bin = filepath.Join(dir, "rerouted")
	lab = filepath.Join(dir, "rerouted-lab")
	client = filepath.Join(dir, "worldclient")
	if pre := os.Getenv(BinEnv); pre != "" {
		// Built beforehand: a guest of `make test-kernels` runs no go.
		bin, lab, client = filepath.Join(pre, "rerouted"), filepath.Join(pre, "rerouted-lab"), filepath.Join(pre, "worldclient")
	} else {
		for out, pkg := range map[string]string{bin: "../cmd/rerouted", lab: "../cmd/rerouted-lab", client: "../internal/networld/cmd/worldclient"} {
			if b, err := exec.Command("go", append(append([]string{"build"}, buildFlags...), "-o", out, pkg)...).CombinedOutput(); err != nil {
				fmt.Fprintf(os.Stderr, "build %s: %v\n%s", pkg, err, b)
				os.Exit(1)
			}
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// datapaths runs a test once per datapath, as subtests: every end-to-end
// test that runs the daemon must pass on both.
func datapaths(t *testing.T, test func(t *testing.T, dp string)) {
	worldtest.Require(t) // here, not in each subtest: a test whose subtests all skip must not pass
	for _, dp := range []string{"kernel", "userspace"} {
		t.Run(dp, func(t *testing.T) { test(t, dp) })
	}
}

// policyEngines runs a policy test on the queue engine with each datapath,
// and on the connect engine ("connect": kernel datapath, steering =
// "connect"): the server must see the same source in each. On a kernel
// without connect-time steering the third run decides at the queue too.
func policyEngines(t *testing.T, test func(t *testing.T, dp, steering string)) {
	worldtest.Require(t) // before the test's own set-up (cgroups, programs), which needs root too
	for _, c := range []struct{ name, dp, steering string }{
		{"kernel", "kernel", "queue"}, {"userspace", "userspace", "queue"}, {"connect", "kernel", "connect"},
	} {
		t.Run(c.name, func(t *testing.T) { test(t, c.dp, c.steering) })
	}
}

// newEnvSteering is newEnv with the steering engine set.
func newEnvSteering(t *testing.T, dp, steering, rules string) *env {
	t.Helper()
	e := newEnv(t, dp, rules)
	e.steering = steering
	e.writeConfig(rules)
	return e
}

// kernelDecides says whether the daemon's ready line says that the kernel
// decides host marks (call after start): on the kernel datapath, wherever
// the kernel can (TestKernelHasEveryFeature checks where).
func (e *env) kernelDecides() bool {
	_, err := e.d.WaitFor("host_marks=kernel", 0)
	return err == nil
}

// steers says whether the daemon announced connect-time steering (call
// after start).
func (e *env) steers() bool {
	_, err := e.d.WaitFor("connect-time steering: rules the kernel can decide", 0)
	return err == nil
}

// env is one test's world, configuration and daemon.
type env struct {
	t  *testing.T
	dp string // datapath
	// steering is "connect" for a test of both engines' verdicts
	// (policyEngines); "" or "queue" is configHead's own.
	steering string
	w        *networld.World
	dir      string
	cfg      string // path of the config file
	sock     string
	d        *networld.Daemon
	// readyBudget: how long the daemon may take to start, where more than
	// networld.ReadyTimeout (a large policy's tests).
	readyBudget time.Duration
}

// configHead is the part of every test configuration before the rules.
const configHead = `[daemon]
queue = 0
control_socket = %q
gc_interval = "200ms"
idle_timeout = "2s"
datapath = %q
steering = "queue" # what most tests examine; the connect engine's tests say "connect"

[[uplink]]
name = "isp-b"
mark = 100
interface = "hb"
`

// newEnv builds a world and writes a configuration for datapath dp with the
// given rules.
func newEnv(t *testing.T, dp, rules string) *env {
	t.Helper()
	w := worldtest.World(t)
	// The host's TIME_WAIT sockets ignore RSTs (RFC 1337), as the tests
	// mean them to live their 60 s. Without it, Linux lets a RST end a
	// TIME_WAIT socket, and the test world makes one: when the server's
	// FIN is acknowledged late (the userspace datapath queues the ACK, a
	// few ms; QEMU's emulation, more), the server's tail loss probe sends
	// the FIN again, the client's TIME_WAIT socket acknowledges the copy,
	// the server, closed meanwhile, answers with a RST, and the socket is
	// gone: its flow rightly ends, but early for the test (seen as 1-5 of
	// TestFlowsLiveExactlyAsLongAsSockets' 200 sockets, and the kernel
	// matrix's TestRuleDecidesUplink/kernel on 6.1).
	if err := w.Host.Sysctl("net.ipv4.tcp_rfc1337=1"); err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, dp: dp, w: w, dir: t.TempDir()}
	e.sock = filepath.Join(e.dir, "rerouted.sock")
	e.cfg = filepath.Join(e.dir, "rerouted.toml")
	e.writeConfig(rules)
	for _, port := range []uint16{80, 8080} {
		if _, err := w.Serve(port); err != nil {
			t.Fatal(err)
		}
	}
	return e
}

// writeConfig (re)writes the configuration file: the common head, then rules.
func (e *env) writeConfig(rules string) {
	e.t.Helper()
	head := fmt.Sprintf(configHead, e.sock, e.dp)
	if e.steering == "connect" {
		head = e.headWith("connect", "")
	}
	if err := os.WriteFile(e.cfg, []byte(head+rules), 0o600); err != nil {
		e.t.Fatal(err)
	}
}

// start runs the daemon with --debug and waits until it is ready; env adds
// environment variables.
func (e *env) start(env ...string) *networld.Daemon {
	e.t.Helper()
	var echo io.Writer
	if os.Getenv("REROUTED_E2E_ECHO") != "" { // the daemon's lines as they come, for a test that hangs
		echo = os.Stderr
	}
	d, err := e.w.StartDaemonEnv(bin, e.cfg, env, echo, "--debug")
	if err != nil {
		e.t.Fatal(err)
	}
	e.d = d
	e.t.Cleanup(func() {
		if e.t.Failed() {
			e.t.Logf("rerouted output:\n%s", d.Output())
		}
		d.Kill()
	})
	// A daemon starts within networld.ReadyTimeout (2 s natively), unless
	// the test gives it a budget of its own (a large policy's), or it loads
	// the connect-time program natively: the kernel's verifier alone takes
	// ~3.1 s over its four programs on Linux 6.18 (connect6 and sendmsg6
	// each ~580,000 instructions processed, of the 1,000,000 limit; see
	// connectReadyTimeout).
	ready := networld.ReadyTimeout()
	if !testenv.InGuest() && steersAtConnect(e.cfg) {
		ready = connectReadyTimeout
	}
	if e.readyBudget > ready {
		ready = e.readyBudget
	}
	started := time.Now()
	if err := d.WaitReadyWithin(ready); err != nil {
		e.t.Fatalf("%v\n%s", err, d.Output())
	}
	e.t.Logf("rerouted ready in %v", time.Since(started).Round(time.Millisecond))
	checkSteering(e.t, d, e.cfg)
	// Which enqueue form the kernel took (make test-kernels reports it).
	if line, err := d.WaitFor("msg=ready", 0); err == nil {
		if m := queueMethodRE.FindStringSubmatch(line); m != nil {
			e.t.Logf("rerouted ready: queue_method=%q", strings.Trim(m[1], `"`))
		}
	}
	return d
}

// connectReadyTimeout is a native start's budget with connect-time
// steering: 2 s, and the verifier's ~3.1 s on the connect-time program.
// KNOWN COST, not a tolerance: the program's verification is what makes a
// native start with steering = "connect" (the default) miss 2 s; a smaller
// program is the fix, and this bound is to come down with it.
const connectReadyTimeout = 5 * time.Second

var queueMethodRE = regexp.MustCompile(`queue_method=("[^"]*"|\S*)`)

// hostMark installs a mark rule for a port on the host, the way operators do.
func (e *env) hostMark(kind string, port uint16) {
	e.t.Helper()
	var err error
	switch kind {
	case "iptables":
		_, err = e.w.Host.Run("iptables", "-t", "mangle", "-A", "OUTPUT", "-p", "tcp", "--dport", strconv.Itoa(int(port)),
			"-j", "MARK", "--set-mark", strconv.Itoa(networld.MarkB))
	case "nft":
		err = e.w.Host.Nft(fmt.Sprintf("table inet hostmark {\n\tchain output {\n\t\ttype route hook output priority mangle; policy accept;\n\t\ttcp dport %d meta mark set %d\n\t}\n}\n", port, networld.MarkB))
	default:
		err = fmt.Errorf("unknown mark rule kind %q", kind)
	}
	if err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) counter(isp *networld.ISP, name string) uint64 {
	e.t.Helper()
	n, err := isp.Counter(name)
	if err != nil {
		e.t.Fatal(err)
	}
	return n
}

// flows lists the daemon's flows through the CLI, as an operator would.
func (e *env) flows() []control.FlowInfo {
	e.t.Helper()
	out, err := exec.Command(bin, "flows", "--config", e.cfg, "--json").Output()
	if err != nil {
		e.t.Fatalf("rerouted flows --json: %v", err)
	}
	var reply struct {
		Flows []control.FlowInfo `json:"flows"`
	}
	if err := json.Unmarshal(out, &reply); err != nil {
		e.t.Fatalf("rerouted flows --json printed %q: %v", out, err)
	}
	if reply.Flows == nil {
		e.t.Fatalf("rerouted flows --json has no \"flows\" array: %s", out)
	}
	return reply.Flows
}

// flowSets names the daemon's per-flow sets (maps with the kernel datapath).
func (e *env) flowSets() []string {
	if e.dp == "userspace" {
		return []string{"tcp_uout4", "tcp_uin4"}
	}
	return []string{"tcp_out4", "tcp_in4"}
}

// elements counts the elements of one of the daemon's nft sets or maps.
func (e *env) elements(name string) int {
	e.t.Helper()
	kind := "map"
	if e.dp == "userspace" || strings.Contains(name, "_pass") {
		kind = "set"
	}
	out, err := e.w.Host.Run("nft", "-j", "list", kind, "inet", "rerouted", name)
	if err != nil {
		e.t.Fatal(err)
	}
	var doc struct {
		Nftables []map[string]json.RawMessage `json:"nftables"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		e.t.Fatal(err)
	}
	for _, obj := range doc.Nftables {
		if raw, ok := obj[kind]; ok {
			var m struct {
				Elem []json.RawMessage `json:"elem"`
			}
			if err := json.Unmarshal(raw, &m); err != nil {
				e.t.Fatal(err)
			}
			return len(m.Elem)
		}
	}
	e.t.Fatalf("no map %s in %s", name, out)
	return 0
}

// endTimeWait ends the host's TIME_WAIT sockets towards dst at once (ss
// -K), and reports whether it could: kernels before 6.0 cannot destroy a
// TIME_WAIT socket, which then lasts its 60 s.
func (e *env) endTimeWait(dst string) bool {
	e.t.Helper()
	if _, err := e.w.Host.Run("ss", "-K", "state", "time-wait", "dst", dst); err != nil && !strings.Contains(err.Error(), "exit status") {
		e.t.Fatal(err)
	}
	out, err := e.w.Host.Run("ss", "-Htan", "state", "time-wait", "dst", dst)
	if err != nil {
		e.t.Fatal(err)
	}
	if strings.TrimSpace(out) != "" {
		e.t.Log("this kernel cannot destroy TIME_WAIT sockets (ss -K; Linux 6.0 can): they last 60 s")
		return false
	}
	return true
}

// waitISPB waits until `rerouted uplinks` shows ISP B's IPv4 state as up
// (or down) and the daemon's last announcement of it says so too: the
// daemon announces a transition after the connect-time program has it, so
// from then on both engines act on it.
func (e *env) waitISPB(up bool, timeout time.Duration) {
	e.t.Helper()
	want := "down"
	if up {
		want = "up"
	}
	eventually(e.t, timeout, "ISP B to be "+want, func() bool {
		if e.uplinks()["isp-b/ipv4"].Up != up {
			return false
		}
		last := ""
		for _, l := range e.d.Lines() {
			if strings.Contains(l, "[UPLINK] isp-b ipv4 ") {
				last = l
			}
		}
		return strings.Contains(last, "[UPLINK] isp-b ipv4 "+want)
	})
}

// eventually polls cond until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func tables(t *testing.T, ns *networld.NS) string {
	t.Helper()
	out, err := ns.Run("nft", "list", "tables")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

// newEnvIn is a second daemon environment in e's world: its own directory,
// configuration and control socket.
func newEnvIn(t *testing.T, e *env, dp string) *env {
	t.Helper()
	o := &env{t: t, dp: dp, w: e.w, dir: t.TempDir()}
	o.sock = filepath.Join(o.dir, "rerouted.sock")
	o.cfg = filepath.Join(o.dir, "rerouted.toml")
	o.writeConfig("")
	return o
}
