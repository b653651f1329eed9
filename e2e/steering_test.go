package e2e

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
)

const steeringRules = `
[[rule]]
name = "web-b"
uplink = "isp-b"
protocol = "tcp"
dport = [8080]

[[rule]]
name = "dns-b"
uplink = "isp-b"
protocol = "udp"
dport = [5353]

[[rule]]
name = "by-exe"
uplink = "isp-b"
exe = ["/tmp/no-such-program", %q]
dport = [8082]

[[rule]]
name = "api-only-b"
uplink = "isp-b"
on_down = "drop"
dport = [8083]
`

// With steering = "connect", a socket a rule sends via ISP B is bound to
// ISP B's address inside connect(): the application's own getsockname()
// shows it, the server sees it, and nothing is queued or translated. A
// rule only the daemon can decide (an exe key) is left to the queue's way.
// When ISP B goes down, the kernel program follows: the rule falls back
// to the host's routing, or refuses the connection (on_down = "drop").
func TestConnectSteering(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	rules := fmt.Sprintf(steeringRules, self)
	e := newEnv(t, "kernel", rules)
	cfg := e.headWith("connect", "metrics_listen = \"127.0.0.1:9477\"\n")
	e.writeRaw(cfg + rules)
	for _, port := range []uint16{8082, 8083} {
		if _, err := e.w.Serve(port); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.w.ServeUDP(5353); err != nil {
		t.Fatal(err)
	}
	e.start()
	if _, err := e.d.WaitFor("connect-time steering: rules the kernel can decide", time.Second); err != nil {
		// A kernel that cannot (before Linux 5.14: no SO_NETNS_COOKIE)
		// must say so at start and decide everything at the queue.
		line, werr := e.d.WaitFor("connect-time steering is not available: every new flow is decided at the queue", 0)
		if werr != nil {
			t.Fatalf("neither steering nor its fallback was announced:\n%s", e.d.Output())
		}
		t.Logf("this kernel falls back: %s", line)
		c, err := e.w.Dial(networld.DialOptions{Port: 8080})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		local := c.LocalAddr().(*net.TCPAddr).AddrPort()
		peer, _, err := networld.Exchange(c, 0)
		if err != nil || local.Addr() != networld.HostA || peer.Addr() != networld.HostB {
			t.Errorf("fallback: to :8080 on %v, server saw %v, err %v; want translated by the queue's way", local, peer, err)
		}
		if out, _ := e.w.Host.Command(bin, "doctor", "--config", e.cfg).CombinedOutput(); !strings.Contains(string(out), `steering = "connect" cannot work here`) {
			t.Errorf("doctor does not name what the kernel lacks:\n%s", out)
		}
		return
	}

	// dial connects and returns the socket's own address and the one the
	// server saw.
	dial := func(dst netip.Addr, port uint16) (local, seen netip.AddrPort, err error) {
		c, err := e.w.Dial(networld.DialOptions{Dst: dst, Port: port})
		if err != nil {
			return local, seen, err
		}
		defer c.Close()
		local = c.LocalAddr().(*net.TCPAddr).AddrPort()
		seen, _, err = networld.Exchange(c, 0)
		return netip.AddrPortFrom(local.Addr().Unmap(), local.Port()), seen, err
	}
	queued := e.queued()
	for _, c := range []struct {
		dst, want netip.Addr
	}{{networld.ServerAddr, networld.HostB}, {networld.Server6, networld.HostB6}} {
		local, seen, err := dial(c.dst, 8080)
		if err != nil {
			t.Fatal(err)
		}
		if local.Addr() != c.want || seen != local {
			t.Errorf("to %v:8080: the socket is on %v, the server saw %v; want both on %v", c.dst, local, seen, c.want)
		}
		line := fmt.Sprintf("[BIND] tcp dst=%s dport=8080 => src=%s uplink=isp-b uid=0 pid=", c.dst, c.want)
		if _, err := e.d.WaitFor(line, time.Second); err != nil {
			t.Error(err)
		}
	}
	// Connected UDP too.
	s, err := e.w.UDPSocket(netip.AddrPortFrom(networld.ServerAddr, 5353), true, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	if local := s.LocalAddr().(*net.UDPAddr).AddrPort(); local.Addr().Unmap() != networld.HostB {
		t.Errorf("connected UDP socket to :5353 is on %v, want %v", local, networld.HostB)
	}
	if peer, err := networld.AskUDP(s, netip.AddrPortFrom(networld.ServerAddr, 5353), "q", 2*time.Second); err != nil || peer.Addr() != networld.HostB {
		t.Errorf("UDP to :5353: server saw %v, err %v", peer, err)
	}
	s.Close()
	if n := e.queued() - queued; n != 0 {
		t.Errorf("%d packets were queued to the daemon for steered connections, want 0", n)
	}
	// Unconnected UDP: each datagram a rule sends via ISP B leaves with
	// ISP B's address as its source (sendmsg); the daemon then only adds
	// the mark, keeping the address.
	uu, err := e.w.UDPSocket(netip.AddrPortFrom(networld.ServerAddr, 5353), false, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	if peer, err := networld.AskUDP(uu, netip.AddrPortFrom(networld.ServerAddr, 5353), "q", 2*time.Second); err != nil || peer.Addr() != networld.HostB {
		t.Errorf("unconnected UDP to :5353: server saw %v, err %v", peer, err)
	} else if _, err := e.d.WaitFor(fmt.Sprintf("[NEW] udp src=%s dst=%s sport=%d dport=5353 mark=100 => src=%s sport=%d", networld.HostB, networld.ServerAddr, peer.Port(), networld.HostB, peer.Port()), time.Second); err != nil {
		t.Errorf("the unconnected datagram's source was not ISP B's before the daemon saw it: %v", err)
	}
	uu.Close()
	if v := e.metric(`rerouted_connect_decisions_total{result="datagram_source"}`); v != 1 {
		t.Errorf("datagrams given their source: %v, want 1", v)
	}
	// (That first datagram went to the daemon, for its mark.)
	// A local service's socket (unconnected, on a port of its own) is
	// left to the daemon, which applies only owner rules to it: none here.
	svc, err := e.w.UDPSocket(netip.AddrPort{}, false, netip.AddrPortFrom(netip.IPv4Unspecified(), 5000))
	if err != nil {
		t.Fatal(err)
	}
	if peer, err := networld.AskUDP(svc, netip.AddrPortFrom(networld.ServerAddr, 5353), "q", 2*time.Second); err != nil || peer != netip.AddrPortFrom(networld.HostA, 5000) {
		t.Errorf("a service's datagram from :5000 to :5353: server saw %v, err %v; want %v:5000", peer, err, networld.HostA)
	}
	svc.Close()
	queued = e.queued() // the service's datagram went to the daemon too

	// A connection no rule concerns is left alone.
	if local, seen, err := dial(networld.ServerAddr, 80); err != nil || local.Addr() != networld.HostA || seen != local {
		t.Errorf("to :80: on %v, server saw %v, err %v; want ISP A's address", local, seen, err)
	}
	if n := e.queued() - queued; n != 0 {
		t.Errorf("%d packets were queued to the daemon for an untouched connection, want 0", n)
	}
	// No flow was translated; the steered sockets are listed as such,
	// a live one among them.
	live, err := e.w.Dial(networld.DialOptions{Port: 8080})
	if err != nil {
		t.Fatal(err)
	}
	liveAddr := live.LocalAddr().(*net.TCPAddr).AddrPort()
	listed := false
	for _, f := range e.flows() {
		if !strings.HasPrefix(f.Rule, "at connect (isp-b)") || f.Original != f.Reply.Swap() {
			t.Errorf("a flow was translated: %+v", f)
		}
		if f.Proto == "tcp" && f.Original.Src == liveAddr.Addr() && f.Original.Sport == liveAddr.Port() {
			listed = true
		}
	}
	if !listed {
		t.Errorf("the live steered connection from %v is not listed", liveAddr)
	}
	live.Close()

	// A socket that marks itself (SO_MARK, here a mark no uplink has) is
	// the host's to route, with honor_marks: the program leaves it alone,
	// mark and address, and so does the daemon.
	if c, err := e.w.Dial(networld.DialOptions{Port: 8080, Mark: 200}); err != nil {
		t.Error(err)
	} else {
		local := c.LocalAddr().(*net.TCPAddr).AddrPort()
		peer, _, err := networld.Exchange(c, 0)
		c.Close()
		if err != nil || local.Addr() != networld.HostA || peer != local {
			t.Errorf("a socket marked 200 to :8080: on %v, server saw %v, err %v; want left alone on ISP A's address", local, peer, err)
		}
	}

	// The exe rule is the daemon's: the socket stays on ISP A's address
	// and the queue's way translates it.
	if local, seen, err := dial(networld.ServerAddr, 8082); err != nil || local.Addr() != networld.HostA || seen.Addr() != networld.HostB {
		t.Errorf("to :8082 (exe rule): on %v, server saw %v, err %v; want translated from ISP A's address to ISP B's", local, seen, err)
	}
	if v := e.metric(`rerouted_connect_decisions_total{result="steered"}`); v != 4 {
		t.Errorf("steered connects: %v, want 4 (TCP IPv4 and IPv6, UDP, the live one)", v)
	}
	if v := e.metric(`rerouted_connect_decisions_total{result="stopped"}`); v != 1 {
		t.Errorf("connects left to the queue: %v, want 1", v)
	}

	// ISP B goes down: web-b falls back to the host's routing (ISP A),
	// api-only-b refuses at connect().
	e.linkB(false)
	e.waitISPB(false, 3*time.Second)
	if local, seen, err := dial(networld.ServerAddr, 8080); err != nil || local.Addr() != networld.HostA || seen != local {
		t.Errorf("to :8080 with ISP B down: on %v, server saw %v, err %v; want ISP A, untranslated", local, seen, err)
	}
	if _, _, err := dial(networld.ServerAddr, 8083); !errors.Is(err, syscall.EPERM) {
		t.Errorf("to :8083 (on_down = drop) with ISP B down: %v, want EPERM", err)
	}
	if _, err := e.d.WaitFor(`[REFUSED] tcp dst=192.0.2.80 dport=8083`, time.Second); err != nil {
		t.Error(err)
	}
	e.linkB(true)
	e.waitISPB(true, 3*time.Second)
	if local, seen, err := dial(networld.ServerAddr, 8083); err != nil || local.Addr() != networld.HostB || seen != local {
		t.Errorf("to :8083 with ISP B back: on %v, server saw %v, err %v", local, seen, err)
	}

	// explain says which engine decides.
	for dport, want := range map[string]string{
		"8080": `at connect(): rule "web-b" binds the socket to isp-b's address`,
		"8082": `at connect(): rule "by-exe" stops the kernel's evaluation`,
	} {
		out, err := exec.Command(bin, "explain", "--config", e.cfg, "--dst", "192.0.2.80:"+dport, "--pid", strconv.Itoa(os.Getpid()), "--protocol", "tcp").CombinedOutput()
		if err != nil || !strings.Contains(string(out), want) {
			t.Errorf("explain :%s: %v\n%s\nwant %q", dport, err, out, want)
		}
	}

	// doctor says it can work here.
	if out, _ := e.w.Host.Command(bin, "doctor", "--config", e.cfg).CombinedOutput(); !strings.Contains(string(out), `steering = "connect": the connect-time program loads`) {
		t.Errorf("doctor does not confirm connect-time steering:\n%s", out)
	}

	// SIGTERM detaches the program: a socket connecting after it is left
	// alone (without rerouted, :8080 leaves ISP A with ISP A's address).
	if err := e.d.Stop(); err != nil {
		t.Fatal(err)
	}
	if local, _, err := dial(networld.ServerAddr, 8080); err != nil || local.Addr() != networld.HostA {
		t.Errorf("after the daemon stopped: on %v, err %v; want ISP A's address (the program detached)", local, err)
	}
}

// headWith is the configuration head with steering set and more [daemon]
// lines (each ending in a newline, or "").
func (e *env) headWith(steering, daemonLines string) string {
	return strings.Replace(fmt.Sprintf(configHead, e.sock, e.dp), "steering = \"queue\"", daemonLines+"steering = \""+steering+"\"", 1)
}

// writeRaw writes the configuration file as given.
func (e *env) writeRaw(cfg string) {
	e.t.Helper()
	if err := os.WriteFile(e.cfg, []byte(cfg), 0o600); err != nil {
		e.t.Fatal(err)
	}
}

// ISP B renumbers the host while sockets are bound to its old address at
// connect(): they can never send again, so they are closed at once (the
// TCP application sees its connection aborted, the UDP one its socket),
// and new sockets take the new address.
func TestConnectSteeringRenumber(t *testing.T) {
	e := newEnv(t, "kernel", "")
	rules := `
[[rule]]
name = "web-b"
uplink = "isp-b"
dport = [80, 53]
`
	cfg := e.headWith("connect", "")
	e.writeRaw(cfg + rules)
	if _, err := e.w.ServeUDP(53); err != nil {
		t.Fatal(err)
	}
	if err := e.w.Host.Sysctl("net.ipv4.conf.hb.promote_secondaries=1"); err != nil {
		t.Fatal(err)
	}
	e.start()
	held, err := e.w.Dial(networld.DialOptions{Port: 80})
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if a := held.LocalAddr().(*net.TCPAddr).AddrPort().Addr(); a != networld.HostB {
		t.Fatalf("the held connection is on %v, want %v", a, networld.HostB)
	}
	dns := netip.AddrPortFrom(networld.ServerAddr, 53)
	u, err := e.w.UDPSocket(dns, true, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	if p, err := networld.AskUDP(u, dns, "before", 2*time.Second); err != nil || p.Addr() != networld.HostB {
		t.Fatalf("udp before: server saw %v, err %v", p, err)
	}

	if _, err := e.w.Host.Run("ip", "addr", "add", "203.0.113.3/24", "dev", "hb"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.w.Host.Run("ip", "addr", "del", "203.0.113.2/24", "dev", "hb"); err != nil {
		t.Fatal(err)
	}
	gone := time.Now()
	held.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, err = held.Read(make([]byte, 1024))
	for err == nil { // the greeting, then the abort
		_, err = held.Read(make([]byte, 1024))
	}
	if !errors.Is(err, syscall.ECONNABORTED) && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the held connection on the old address: %v, want it aborted", err)
	} else {
		t.Logf("the held connection was aborted %v after the address went", time.Since(gone).Round(time.Millisecond))
	}
	if _, err := networld.AskUDP(u, dns, "after", time.Second); err == nil {
		t.Error("the UDP socket on the old address still answers")
	}
	// The first new connection takes .3: by the time the old address's
	// sockets are closed, the program has the new one (as the queue
	// engine's TestRenumbering, no retry).
	c, err := e.w.Dial(networld.DialOptions{Port: 80})
	if err != nil {
		t.Fatalf("the first connection after the renumbering: %v", err)
	}
	defer c.Close()
	local := c.LocalAddr().(*net.TCPAddr).AddrPort().Addr()
	if peer, _, err := networld.Exchange(c, 0); err != nil || peer.Addr() != hostB3 || local != hostB3 {
		t.Errorf("the first connection after the renumbering is on %v, the server saw %v (err %v); want both on %v", local, peer, err, hostB3)
	}
	if _, err := e.d.WaitFor("uplink renumbered: closed the sockets bound at connect() to its old address", time.Second); err != nil {
		t.Error(err)
	}
}

// A balance decided at connect(): new sockets are bound to either uplink's
// address, by weight, each keeping it for life; with one uplink down, all
// take the other.
func TestConnectSteeringBalance(t *testing.T) {
	e := newEnv(t, "kernel", "")
	rules := `
[uplink.health]
targets = ["tcp:192.0.2.80:80"]
interval = "200ms"
timeout = "150ms"
down_after = 1

[[uplink]]
name = "isp-a"
mark = 200
interface = "ha"
gateway = "198.51.100.1"
table = 200
[uplink.health]
targets = ["tcp:192.0.2.80:80"]
interval = "200ms"
timeout = "150ms"
down_after = 1

[[rule]]
name = "spread"
balance = { "isp-a" = 1, "isp-b" = 1 }
dport = [80]
`
	// Both uplinks are probed on the balanced port. The probes (bound to
	// their uplink's address, with its mark and the probes' socket
	// priority) are never steered, even with honor_marks off: no uplink
	// flaps.
	cfg := e.headWith("connect", "honor_marks = false\n")
	e.writeRaw(strings.Replace(cfg, "interface = \"hb\"\n", "interface = \"hb\"\n"+rules[:strings.Index(rules, "[[uplink]]")], 1) + rules[strings.Index(rules, "[[uplink]]"):])
	e.start()
	time.Sleep(time.Second) // five probe rounds
	count := func(n int) map[netip.Addr]int {
		seen := map[netip.Addr]int{}
		for i := 0; i < n; i++ {
			c, err := e.w.Dial(networld.DialOptions{Port: 80})
			if err != nil {
				t.Fatal(err)
			}
			peer, _, err := networld.Exchange(c, 0)
			local := c.LocalAddr().(*net.TCPAddr).AddrPort()
			c.Close()
			if err != nil || peer != local {
				t.Fatalf("connection %d: on %v, server saw %v, err %v", i, local, peer, err)
			}
			seen[local.Addr()]++
		}
		return seen
	}
	if seen := count(40); seen[networld.HostA] == 0 || seen[networld.HostB] == 0 || len(seen) != 2 {
		t.Errorf("40 balanced connections were bound to %v, want both uplinks' addresses", seen)
	} else {
		t.Logf("40 balanced connections: %v", seen)
	}
	if strings.Contains(e.d.Output(), "uplink is down") {
		t.Errorf("an uplink went down while both were healthy: probes were steered\n%s", e.d.Output())
	}
	e.linkB(false)
	e.waitISPB(false, 3*time.Second)
	if seen := count(10); seen[networld.HostA] != 10 {
		t.Errorf("with ISP B down, 10 connections were bound to %v, want all on ISP A's address", seen)
	}
}

// privateBPFFS makes a mount namespace with a bpffs of its own at
// /sys/fs/bpf, for the test's life, and returns nsenter's option that
// enters it: what daemons pin there is pinned nowhere on the machine.
func privateBPFFS(t *testing.T) string {
	t.Helper()
	holder := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c",
		"mount -t bpf bpf /sys/fs/bpf && echo mounted && exec sleep 600")
	out, err := holder.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	line := make([]byte, 8)
	if n, err := out.Read(line); err != nil || !strings.HasPrefix(string(line[:n]), "mounted") {
		t.Fatalf("a mount namespace with its own bpffs: %q, %v", line[:n], err)
	}
	return fmt.Sprintf("--mount=/proc/%d/ns/mnt", holder.Process.Pid)
}

// A restart (SIGUSR2) leaves the connect-time program attached and
// deciding, pinned under bpffs; the next daemon adopts it; SIGTERM then
// detaches it and removes its pins. The daemons run in a mount namespace
// of the test's own with a bpffs of its own, so nothing is pinned on the
// machine.
func TestConnectSteeringSurvivesRestart(t *testing.T) {
	worldtest.Require(t) // before the mount namespace
	mnt := privateBPFFS(t)

	e := newEnv(t, "kernel", "")
	e.w.DaemonPrefix = []string{"nsenter", mnt, "--"}
	cfg := e.headWith("connect", "")
	e.writeRaw(cfg + "\n[[rule]]\nname = \"web-b\"\nuplink = \"isp-b\"\ndport = [8080]\n")
	on := func(what string) netip.Addr {
		t.Helper()
		c, err := e.w.Dial(networld.DialOptions{Port: 8080})
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		defer c.Close()
		peer, _, err := networld.Exchange(c, 0)
		local := c.LocalAddr().(*net.TCPAddr).AddrPort()
		if err != nil || peer != local {
			t.Fatalf("%s: on %v, server saw %v, err %v", what, local, peer, err)
		}
		return local.Addr()
	}
	pins := func() string {
		out, _ := exec.Command("nsenter", mnt, "--", "sh", "-c", "ls /sys/fs/bpf/rerouted/* 2>/dev/null").CombinedOutput()
		return strings.TrimSpace(string(out))
	}
	d := e.start()
	if a := on("first daemon"); a != networld.HostB {
		t.Fatalf("first daemon: bound to %v, want %v", a, networld.HostB)
	}
	if p := pins(); !strings.Contains(p, "link_connect4") {
		t.Fatalf("nothing pinned: %q\n%s", p, d.Output())
	}
	d.Signal(syscall.SIGUSR2)
	var ee *exec.ExitError
	if err := d.Wait(10 * time.Second); !errors.As(err, &ee) || ee.ExitCode() != 75 {
		t.Fatalf("after SIGUSR2: %v, want exit status 75\n%s", err, d.Output())
	}
	if a := on("no daemon running"); a != networld.HostB {
		t.Errorf("between the daemons: bound to %v, want %v (the pinned program decides)", a, networld.HostB)
	}
	d = e.start()
	if _, err := d.WaitFor("adopted=true", time.Second); err != nil {
		t.Error(err)
	}
	if a := on("second daemon"); a != networld.HostB {
		t.Errorf("second daemon: bound to %v, want %v", a, networld.HostB)
	}
	if err := d.Stop(); err != nil {
		t.Fatal(err)
	}
	if a := on("after SIGTERM"); a != networld.HostA {
		t.Errorf("after SIGTERM: bound to %v, want %v (detached)", a, networld.HostA)
	}
	if p := pins(); p != "" {
		t.Errorf("pins left after SIGTERM: %s", p)
	}
}
