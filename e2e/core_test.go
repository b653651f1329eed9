package e2e

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
)

const webRule = `
[[rule]]
name = "web"
uplink = "isp-b"
dport = [80]
`

// The problem rerouted exists for (a marked packet leaves ISP B with ISP
// A's address and is dropped there), reproduced and then fixed, with the host's own mark
// rule written for iptables(-nft) and for an nft route chain.
func TestForeignSourceFixedForHostMarks(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		for _, kind := range []string{"iptables", "nft"} {
			t.Run(kind, func(t *testing.T) {
				if kind == "iptables" {
					if _, err := exec.LookPath("iptables"); err != nil {
						t.Fatal("iptables is not installed (.ci/run installs it)")
					}
				}
				e := newEnv(t, dp, "")
				e.hostMark(kind, 80)

				// Without rerouted: the SYN goes out ISP B with ISP A's address
				// and ISP B drops it.
				dropped := e.counter(e.w.B, "foreign")
				if peer, err := e.w.Fetch(80, 1500*time.Millisecond); err == nil {
					t.Fatalf("marked connection succeeded without rerouted (server saw %v): the world does not reproduce the problem", peer)
				}
				if e.counter(e.w.B, "foreign") == dropped {
					t.Fatal("ISP B's drop counter did not rise for the untranslated marked SYN")
				}

				// With rerouted.
				e.start()
				droppedB, viaA := e.counter(e.w.B, "foreign"), e.counter(e.w.A, "forwarded")
				peer, err := e.w.Fetch(80, 3*time.Second)
				if err != nil {
					t.Fatalf("marked connection with rerouted: %v", err)
				}
				if peer.Addr() != networld.HostB {
					t.Fatalf("server saw %v, want ISP B's address %v", peer, networld.HostB)
				}
				if n := e.counter(e.w.B, "foreign"); n != droppedB {
					t.Errorf("ISP B dropped %d packets with a foreign source", n-droppedB)
				}
				if n := e.counter(e.w.A, "forwarded"); n != viaA {
					t.Errorf("%d packets leaked out through ISP A", n-viaA)
				}
				// The debug line, exactly as documented; the connection was
				// made by this test process.
				exe, _ := os.Executable()
				// The queue names the owner as the SYN waits; the kernel
				// decides alone and the daemon learns the owner afterwards,
				// unless the process closed its socket already (this one
				// closes at once).
				owner, suffix := fmt.Sprintf(`pid=%d comm="[^"]+" exe=%s `, os.Getpid(), regexp.QuoteMeta(exe)), ""
				cgroup := `cgroup=/\S* `
				if e.kernelDecides() {
					owner, cgroup, suffix = "(?:"+owner+")?", "(?:"+cgroup+")?", " decided_by=kernel"
				}
				want := regexp.MustCompile(fmt.Sprintf(`^\[NEW\] tcp src=198\.51\.100\.2 dst=192\.0\.2\.80 sport=%d dport=80 mark=100 => src=203\.0\.113\.2 sport=%d dev=hb uid=0 %s%srule="host mark"%s$`,
					peer.Port(), peer.Port(), owner, cgroup, suffix))
				line, err := e.d.WaitFor("[NEW] tcp", 2*time.Second)
				if err != nil || !want.MatchString(line) {
					t.Errorf("debug line %q (err %v) does not match %s", line, err, want)
				}
			})
		}
	})
}

// A TOML rule, no host mark: port 80 leaves through ISP B (translated, or
// bound to ISP B's address at connect()); a port no rule matches stays on
// ISP A and never becomes a flow.
func TestRuleDecidesUplink(t *testing.T) {
	policyEngines(t, func(t *testing.T, dp, steering string) {
		e := newEnvSteering(t, dp, steering, webRule)
		e.start()
		steered := e.steers()
		peer, err := e.w.Fetch(80, 3*time.Second)
		if err != nil || peer.Addr() != networld.HostB {
			t.Fatalf("port 80: server saw %v (err %v), want %v", peer, err, networld.HostB)
		}
		if steered {
			// Bound to ISP B's address at connect(): no queue, no element.
			if _, err := e.d.WaitFor(`[BIND] tcp dst=192.0.2.80 dport=80 => src=203.0.113.2 uplink=isp-b uid=0 pid=`, 2*time.Second); err != nil {
				t.Error(err)
			}
			if n := e.elements("tcp_out4"); n != 0 {
				t.Errorf("tcp_out4 holds %d elements; a socket bound at connect() needs none", n)
			}
		} else if _, err := e.d.WaitFor(fmt.Sprintf(`sport=%d dev=hb uid=0 pid=`, peer.Port()), 2*time.Second); err != nil {
			t.Error(err)
		}
		other, err := e.w.Fetch(8080, 3*time.Second)
		if err != nil || other.Addr() != networld.HostA {
			t.Fatalf("port 8080: server saw %v (err %v), want untranslated %v", other, err, networld.HostA)
		}
		for _, f := range e.flows() {
			if f.Original.Dport == 8080 {
				t.Errorf("untranslated connection became a flow: %v", f)
			}
		}
		if !steered {
			// The plain listing: socket tuple, then the reply tuple, like conntrack -L.
			out, err := exec.Command(bin, "flows", "--config", e.cfg).Output()
			want := fmt.Sprintf("tcp src=198.51.100.2 dst=192.0.2.80 sport=%d dport=80 src=192.0.2.80 dst=203.0.113.2 sport=80 dport=%d mark=100 dev=hb uid=0 ", peer.Port(), peer.Port())
			if err != nil || !strings.Contains(string(out), want) {
				t.Errorf("rerouted flows printed %q (err %v), want a line with %q", out, err, want)
			}
		}
		// No conntrack-using rule exists on this host: translation made no
		// conntrack entry at all.
		if out, err := e.w.Host.Run("conntrack", "-C"); err != nil || strings.TrimSpace(out) != "0" {
			t.Errorf("conntrack -C = %q (err %v), want 0", out, err)
		}
	})
}

// With a stateful host firewall, a translated connection moves 10 MB and
// closes with FIN, another is reset; every packet of both leaves through ISP
// B with ISP B's address, and the firewall sees nothing invalid.
func TestStatefulFirewallFINAndRST(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, webRule)
		const fw = `table inet hostfw {
		counter invalid_in {}
		counter invalid_out {}
		chain input {
			type filter hook input priority filter; policy drop;
			ct state invalid counter name "invalid_in" drop
			ct state established,related accept
			iif "lo" accept
		}
		chain output {
			type filter hook output priority filter; policy accept;
			ct state invalid counter name "invalid_out" drop
		}
	}
	`
		if err := e.w.Host.Nft(fw); err != nil {
			t.Fatal(err)
		}
		e.start()
		foreign, fin, rst, viaA := e.counter(e.w.B, "foreign"), e.counter(e.w.B, "fin"), e.counter(e.w.B, "rst"), e.counter(e.w.A, "forwarded")

		c, err := e.w.Dial(networld.DialOptions{Port: 80})
		if err != nil {
			t.Fatal(err)
		}
		const size = 10 << 20
		peer, got, err := networld.Exchange(c, size)
		c.Close()
		if err != nil || got != size || peer.Addr() != networld.HostB {
			t.Fatalf("10 MB exchange: peer %v, server received %d of %d, err %v", peer, got, size, err)
		}
		peer2, err := e.w.Abort(80, 3*time.Second)
		if err != nil || peer2.Addr() != networld.HostB {
			t.Fatalf("reset connection: peer %v, err %v", peer2, err)
		}

		eventually(t, 3*time.Second, "the FIN and the RST to cross ISP B", func() bool {
			return e.counter(e.w.B, "fin") > fin && e.counter(e.w.B, "rst") > rst
		})
		if n := e.counter(e.w.B, "foreign"); n != foreign {
			t.Errorf("ISP B dropped %d packets with a foreign source", n-foreign)
		}
		if n := e.counter(e.w.A, "forwarded"); n != viaA {
			t.Errorf("%d packets left through ISP A", n-viaA)
		}
		for _, name := range []string{"invalid_in", "invalid_out"} {
			out, err := e.w.Host.Run("nft", "list", "counter", "inet", "hostfw", name)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(out, "packets 0 ") {
				t.Errorf("host firewall counted invalid packets: %s", out)
			}
		}
		// conntrack holds the socket's own tuple, never the translated one.
		out, err := e.w.Host.Run("conntrack", "-L", "-p", "tcp", "--dport", "80")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(out, "203.0.113.2") || !strings.Contains(out, "src=198.51.100.2") {
			t.Errorf("conntrack entries should show only the socket's tuple:\n%s", out)
		}
	})
}

// 200 connections: every flow keeps its entries while its socket is in
// TIME_WAIT, and all are removed once the sockets are gone. Exactly: no
// socket ends early (the host's TIME_WAIT ignores RSTs, see newEnv), and
// none of their packets leaves through ISP A or with a foreign source
// through ISP B, from the first SYN to the last flow's end.
func TestFlowsLiveExactlyAsLongAsSockets(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, webRule)
		e.start()
		fwdA, foreignB := e.counter(e.w.A, "forwarded"), e.counter(e.w.B, "foreign")
		const n = 200
		for i := 0; i < n; i++ {
			peer, err := e.w.Fetch(80, 3*time.Second)
			if err != nil || peer.Addr() != networld.HostB {
				t.Fatalf("connection %d: peer %v err %v", i, peer, err)
			}
		}
		// The client closed first: its sockets are in TIME_WAIT, and the
		// sweeps (every 200 ms) must keep exactly their flows.
		time.Sleep(time.Second)
		timeWait := func() map[uint16]bool {
			tw, err := e.w.Host.Run("ss", "-Htan", "state", "time-wait", "dst", "192.0.2.80")
			if err != nil {
				t.Fatal(err)
			}
			ports := map[uint16]bool{}
			for _, l := range strings.Split(strings.TrimSpace(tw), "\n") {
				if f := strings.Fields(l); len(f) >= 4 {
					if ap, err := netip.ParseAddrPort(f[2]); err == nil {
						ports[ap.Port()] = true
					}
				}
			}
			return ports
		}
		tw := timeWait()
		if len(tw) != n {
			t.Fatalf("%d of %d sockets in TIME_WAIT, want all", len(tw), n)
		}
		fl := e.flows()
		for _, f := range fl {
			if !tw[f.Original.Sport] {
				t.Errorf("a flow without a TIME_WAIT socket: %+v", f.Original)
			}
		}
		if len(fl) != n {
			t.Fatalf("%d flows for %d sockets in TIME_WAIT\n%s", len(fl), n, e.d.Output())
		}
		for _, m := range e.flowSets() {
			if got := e.elements(m); got != n {
				t.Fatalf("%s has %d elements while %d sockets are in TIME_WAIT", m, got, n)
			}
		}
		// End TIME_WAIT now instead of in 60 s; where the kernel cannot,
		// wait for it.
		wait := 5 * time.Second
		if !e.endTimeWait("192.0.2.80") {
			wait = 70 * time.Second
		}
		eventually(t, wait, "flows and maps to empty", func() bool {
			sets := e.flowSets()
			return len(e.flows()) == 0 && e.elements(sets[0]) == 0 && e.elements(sets[1]) == 0
		})
		if c := strings.Count(e.d.Output(), "[DESTROY] tcp"); c != n {
			t.Errorf("%d DESTROY lines, want %d", c, n)
		}
		if d := e.counter(e.w.A, "forwarded") - fwdA; d != 0 {
			t.Errorf("ISP A forwarded %d packets of the translated connections", d)
		}
		if d := e.counter(e.w.B, "foreign") - foreignB; d != 0 {
			t.Errorf("ISP B dropped %d packets with a foreign source", d)
		}
	})
}

// A SYN is released only once its flow's kernel elements are installed:
// else the SYN-ACK would meet a closed port and only the SYN's
// retransmission, a second later, would get through. The installer is
// slowed down to make any such race certain.
func TestSYNWaitsForItsElements(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, webRule)
		e.start("REROUTED_TEST_INSTALL_DELAY=300ms")
		for i := 0; i < 3; i++ {
			t0 := time.Now()
			c, err := e.w.Dial(networld.DialOptions{Port: 80})
			if err != nil {
				t.Fatalf("connection %d: %v", i, err)
			}
			switch d := time.Since(t0); {
			case d < 250*time.Millisecond:
				t.Fatalf("connected in %v: the SYN did not wait for the 300 ms install", d)
			case d > 900*time.Millisecond:
				t.Fatalf("connected in %v: the first SYN-ACK was lost and only the SYN's retransmission (after 1 s) got through", d)
			}
			peer, n, err := networld.Exchange(c, 1<<20)
			c.Close()
			if err != nil || n != 1<<20 || peer.Addr() != networld.HostB {
				t.Fatalf("connection %d: peer %v, %d bytes, err %v", i, peer, n, err)
			}
		}
	})
}

// Bulk data crosses a translated flow byte for byte, both ways (the
// userspace datapath rewrites 64 KB GSO packets: checksums must be right).
func TestBulkByteExact(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, webRule+"\n[[rule]]\nname = \"downloads\"\nuplink = \"isp-b\"\ndport = 8081\n")
		if _, err := e.w.ServeDownload(8081); err != nil {
			t.Fatal(err)
		}
		e.start()
		const size = 20 << 20
		c, err := e.w.Dial(networld.DialOptions{Port: 80})
		if err != nil {
			t.Fatal(err)
		}
		peer, n, err := networld.Exchange(c, size) // checks the SHA-256
		c.Close()
		if err != nil || n != size || peer.Addr() != networld.HostB {
			t.Fatalf("upload: peer %v, %d of %d bytes, err %v", peer, n, size, err)
		}
		d, err := e.w.Dial(networld.DialOptions{Port: 8081})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		d.SetDeadline(time.Now().Add(60 * time.Second))
		fmt.Fprintf(d, "%d %d\n", size, 42)
		got, want := sha256.New(), sha256.New()
		m, err := io.Copy(got, d)
		io.CopyN(want, networld.Stream(42), size)
		if err != nil || m != size || !bytes.Equal(got.Sum(nil), want.Sum(nil)) {
			t.Fatalf("download: %d of %d bytes, err %v, content equal: %v", m, size, err, bytes.Equal(got.Sum(nil), want.Sum(nil)))
		}
		if _, err := e.d.WaitFor("dport=8081 mark=100 => src=203.0.113.2", time.Second); err != nil {
			t.Error(err)
		}
	})
}

// Translations never put a tuple on the wire twice: not one a real socket
// uses, not one another translation uses, and not one a real socket opens
// later.
func TestCollidingTuplesGetDistinctPorts(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, webRule)
		if err := e.w.Host.IP("addr add 198.51.100.3/24 dev ha"); err != nil {
			t.Fatal(err)
		}
		e.start()
		s80, _ := e.w.Serve(80)
		const port = 45000
		hostA2 := netip.MustParseAddr("198.51.100.3")
		hold := func(bind netip.Addr) netip.AddrPort {
			t.Helper()
			c, err := e.w.Dial(networld.DialOptions{Port: 80, Bind: bind, BindPort: port})
			if err != nil {
				t.Fatalf("connect from %v:%d: %v", bind, port, err)
			}
			t.Cleanup(func() { c.Close() })
			peer, err := networld.Greeting(bufio.NewReader(c))
			if err != nil {
				t.Fatal(err)
			}
			return peer
		}
		// 1. A translation of A:45000 goes out as B:45000.
		p1 := hold(networld.HostA)
		// 2. A real socket bound to B:45000 (no translation needed) would now
		//    collide on the wire: it must be moved to another port.
		p2 := hold(networld.HostB)
		// 3. A second local address, A2:45000, would be translated onto
		//    B:45000 too: another port again.
		p3 := hold(hostA2)
		peers := []netip.AddrPort{p1, p2, p3}
		t.Logf("server saw %v", peers)
		if p1 != netip.AddrPortFrom(networld.HostB, port) {
			t.Errorf("first translation changed its port without a collision: %v", p1)
		}
		for i, p := range peers {
			if p.Addr() != networld.HostB {
				t.Errorf("connection %d left with %v", i+1, p)
			}
			for _, q := range peers[:i] {
				if p == q {
					t.Errorf("two connections share %v on the wire", p)
				}
			}
		}
		if got := len(s80.Peers()); got < 3 {
			t.Fatalf("server accepted %d connections", got)
		}
	})
}

// The SYN announces an MSS that fits the new route, not the first one: with
// a 1280-byte MTU towards ISP B the server must not be told 1460.
func TestMSSClampedToNewRoute(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, webRule)
		if err := e.w.Host.IP("link set dev hb mtu 1280"); err != nil {
			t.Fatal(err)
		}
		if err := e.w.B.IP("link set dev cust mtu 1280"); err != nil {
			t.Fatal(err)
		}
		e.start()
		s80, _ := e.w.Serve(80)
		peer, err := e.w.Fetch(80, 3*time.Second)
		if err != nil || peer.Addr() != networld.HostB {
			t.Fatalf("peer %v err %v", peer, err)
		}
		mss := s80.MSS()
		if len(mss) != 1 || mss[0] <= 0 || mss[0] > 1280-40 {
			t.Fatalf("server's MSS = %v, want at most %d (1280 - 40)", mss, 1280-40)
		}
		// Control: port 8080 is untranslated and keeps the 1500-byte route's MSS.
		s8080, _ := e.w.Serve(8080)
		if _, err := e.w.Fetch(8080, 3*time.Second); err != nil {
			t.Fatal(err)
		}
		if m := s8080.MSS(); len(m) != 1 || m[0] <= 1280-40 {
			t.Fatalf("untranslated connection's MSS = %v; the test cannot tell clamping from no clamping", m)
		}
	})
}

// SIGTERM removes the table, every rule and the control socket; a second
// start works.
func TestSIGTERMRemovesEverything(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, webRule)
		before := tables(t, e.w.Host)
		d := e.start()
		if st, err := os.Stat(e.sock); err != nil || st.Mode().Perm() != 0o600 || st.Mode().Type() != os.ModeSocket {
			t.Fatalf("control socket: %v, mode %v; want a socket with mode 0600", err, st.Mode())
		}
		if _, err := e.w.Fetch(80, 3*time.Second); err != nil {
			t.Fatal(err)
		}
		if err := d.Stop(); err != nil {
			t.Fatalf("exit after SIGTERM: %v\n%s", err, d.Output())
		}
		if got := tables(t, e.w.Host); got != before {
			t.Fatalf("tables after SIGTERM = %q, before start = %q", got, before)
		}
		if rs, _ := e.w.Host.Run("nft", "list", "ruleset"); strings.Contains(rs, "queue") || strings.Contains(rs, "rerouted") {
			t.Fatalf("ruleset still mentions rerouted:\n%s", rs)
		}
		if _, err := os.Stat(e.sock); !os.IsNotExist(err) {
			t.Fatalf("control socket %s left behind (stat: %v)", e.sock, err)
		}
		e.start()
		if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostB {
			t.Fatalf("after restart: peer %v err %v", peer, err)
		}
	})
}

// A daemon killed mid-transfer leaves the transfer running with the kernel
// datapath (its entries are in the kernel; with the userspace datapath every
// packet needed the daemon, so that part does not apply), new connections
// fail open through the default route, and a new daemon takes the table
// over.
func TestSIGKILLMidTransfer(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, webRule)
		d := e.start()
		c, err := e.w.Dial(networld.DialOptions{Port: 80})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		r := bufio.NewReader(c)
		peer, err := networld.Greeting(r)
		if err != nil || peer.Addr() != networld.HostB {
			t.Fatalf("greeting: %v %v", peer, err)
		}
		chunk := make([]byte, 1<<20)
		for i := range chunk {
			chunk[i] = byte(i)
		}
		if _, err := c.Write(chunk); err != nil {
			t.Fatal(err)
		}
		if err := d.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		d.Wait(5 * time.Second)
		if dp == "kernel" {
			for i := 0; i < 9; i++ {
				if _, err := c.Write(chunk); err != nil {
					t.Fatalf("write after SIGKILL: %v", err)
				}
			}
			c.CloseWrite()
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatalf("transfer after SIGKILL: %v", err)
			}
			if n, _ := strconv.Atoi(strings.Fields(line)[0]); n != 10<<20 {
				t.Fatalf("server received %d bytes, want %d", n, 10<<20)
			}
		}
		c.Close()
		// No daemon: the queue rule's bypass lets the SYN through untranslated.
		fresh, err := e.w.Fetch(80, 3*time.Second)
		if err != nil || fresh.Addr() != networld.HostA {
			t.Fatalf("new connection with the daemon dead: peer %v err %v; want it to fail open via ISP A", fresh, err)
		}
		// The next daemon adopts the kernel datapath's table (the
		// connection above is in TIME_WAIT: its flow is taken over); the
		// userspace datapath's, which holds no translations, is replaced.
		d2 := e.start()
		want := "adopted the flows an earlier run left"
		if dp == "userspace" {
			want = "removed a table left by an earlier run"
		}
		if _, err := d2.WaitFor(want, time.Second); err != nil {
			t.Error(err)
		}
		if p, err := e.w.Fetch(80, 3*time.Second); err != nil || p.Addr() != networld.HostB {
			t.Fatalf("after restart: %v %v", p, err)
		}
	})
}

// check and run reject every kind of bad configuration with FILE:LINE:COL,
// exit 2, and run installs nothing.
func TestBadConfigsRejected(t *testing.T) {
	dir := t.TempDir()
	const up = "[[uplink]]\nname = \"b\"\nmark = 100\n"
	cases := map[string]struct{ src, want string }{
		"syntax":         {"[daemon\n", ":1:8: "},
		"unknown key":    {up + "[[rule]]\nuplink = \"b\"\ndprot = 80\n", ":6:1: unknown key \"dprot\""},
		"unknown uplink": {up + "[[rule]]\nuplink = \"c\"\n", ":5:1: unknown uplink \"c\""},
		"bad cidr":       {up + "[[rule]]\nuplink = \"b\"\ndst = [\"192.0.2.0/33\"]\n", ":6:1: bad CIDR"},
		"port range":     {up + "[[rule]]\nuplink = \"b\"\ndport = 65536\n", ":6:1: port 65536 is outside 1-65535"},
		"port zero":      {up + "[[rule]]\nuplink = \"b\"\ndport = [\"0-10\"]\n", ":6:1: port range \"0-10\" is outside"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			f := dirFile(t, dir, name, c.src)
			for _, cmd := range []string{"check"} {
				stderr, code := runBin(t, cmd, "--config", f)
				if code != 2 || !strings.HasPrefix(stderr, f+":") || !strings.Contains(stderr, c.want) {
					t.Fatalf("%s: exit %d, stderr %q; want exit 2 and %q", cmd, code, stderr, f+c.want)
				}
			}
		})
	}
	good := dirFile(t, dir, "good", up)
	args := []string{"check", "--config", good}
	if os.Geteuid() != 0 { // the file is the test user's: only root's passes the ownership check
		args = append(args, "--insecure-config")
	}
	if out, code := runBin(t, args...); code != 0 {
		t.Fatalf("check of a good file: exit %d: %s", code, out)
	}
}

// run with a bad file: the same message, exit 2, and nothing installed.
func TestRunWithBadConfigInstallsNothing(t *testing.T) {
	ns := worldtest.NS(t)
	dir := t.TempDir()
	sock := dir + "/s.sock"
	f := dirFile(t, dir, "bad", fmt.Sprintf("[daemon]\ncontrol_socket = %q\n[[uplink]]\nname = \"b\"\nmark = 100\n[[rule]]\nuplink = \"nope\"\n", sock))
	cmd := ns.Command(bin, "run", "--config", f)
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
		t.Fatalf("run exit: %v, output %q", err, out)
	}
	if !regexp.MustCompile(`^` + regexp.QuoteMeta(f) + `:7:1: unknown uplink "nope"`).Match(out) {
		t.Fatalf("run output %q", out)
	}
	if got := tables(t, ns); got != "" {
		t.Fatalf("tables after a rejected run: %q", got)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("control socket created by a rejected run")
	}
}

func dirFile(t *testing.T, dir, name, src string) string {
	t.Helper()
	f := dir + "/" + strings.ReplaceAll(name, " ", "-") + ".toml"
	if err := os.WriteFile(f, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

// runBin runs the binary and returns its stderr and exit code.
func runBin(t *testing.T, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Stdout = io.Discard
	var stderr strings.Builder
	cmd.Stderr = &stderr
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return stderr.String(), ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return stderr.String(), 0
}
