package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
)

// Host marks decided by the kernel itself: no packet of a host-marked flow
// reaches the daemon, and the daemon learns of each flow afterwards.

// kernelEnv is a world whose host marks TCP port 80 and UDP port 53 (and
// pings) for ISP B, with metrics, the daemon started.
func kernelEnv(t *testing.T, extra string) *env {
	t.Helper()
	e := newEnv(t, "kernel", "")
	e.withMetrics("")
	if extra != "" {
		if err := writeFile(e.cfg, strings.Replace(readFile(t, e.cfg), "[daemon]\n", "[daemon]\n"+extra, 1)); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.w.Host.Nft(fmt.Sprintf(`table inet hostmark {
	chain output {
		type route hook output priority mangle; policy accept;
		tcp dport 80 meta mark set %[1]d
		udp dport 53 meta mark set %[1]d
		icmp type echo-request meta mark set %[1]d
		icmpv6 type echo-request meta mark set %[1]d
	}
}
`, networld.MarkB)); err != nil {
		t.Fatal(err)
	}
	e.start()
	if !kernelDecisionsExpected(t) {
		// Before Linux 5.10 the daemon decides host marks, and says why.
		if _, err := e.d.WaitFor("host_marks=queue", 0); err != nil {
			t.Fatalf("the daemon does not say that host marks are decided at the queue on this kernel: %v", err)
		}
		if _, err := e.d.WaitFor(`msg="the kernel cannot decide host-marked flows itself: they are decided at the queue"`, 0); err != nil {
			t.Fatal(err)
		}
		return e
	}
	if _, err := e.d.WaitFor("host_marks=kernel", 0); err != nil {
		t.Fatalf("the daemon does not say that the kernel decides host marks: %v", err)
	}
	return e
}

func readFile(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile(name)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// TCP, UDP and ping, IPv4 and IPv6: each host-marked flow leaves with ISP
// B's address, its replies come back, and nothing is queued; the daemon
// lists the flows, prints them and counts them as the kernel's.
func TestHostMarksDecidedByKernel(t *testing.T) {
	worldtest.Require(t)
	e := kernelEnv(t, "")
	if _, err := e.w.ServeUDP(53); err != nil {
		t.Fatal(err)
	}
	queued, foreign, viaA := e.queued(), e.counter(e.w.B, "foreign"), e.counter(e.w.A, "forwarded")
	for _, dst := range []netip.Addr{networld.ServerAddr, networld.Server6} {
		want := networld.HostB
		if dst.Is6() {
			want = networld.HostB6
		}
		peer, err := e.w.FetchFrom(networld.DialOptions{Dst: dst, Port: 80})
		if err != nil || peer.Addr() != want {
			t.Fatalf("tcp to %v: server saw %v (%v), want %v", dst, peer, err, want)
		}
		u, err := e.w.UDPSocket(netip.AddrPortFrom(dst, 53), true, netip.AddrPort{})
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 3; i++ {
			p, err := networld.AskUDP(u, netip.AddrPortFrom(dst, 53), "q", 2*time.Second)
			if err != nil || p.Addr() != want {
				t.Fatalf("udp to %v: server saw %v (%v), want %v", dst, p, err, want)
			}
		}
		u.Close()
		if _, err := e.w.Ping(dst, networld.PingSocket, 0, 2*time.Second); err != nil {
			t.Fatalf("ping %v: %v", dst, err)
		}
		if _, err := e.d.WaitFor(fmt.Sprintf("[NEW] %s src=%s", map[bool]string{false: "icmp", true: "icmpv6"}[dst.Is6()], map[bool]netip.Addr{false: networld.HostA, true: networld.HostA6}[dst.Is6()]), 2*time.Second); err != nil {
			t.Errorf("ping %v: %v", dst, err)
		}
	}
	kernel := kernelDecidesHere(e)
	if n := e.queued() - queued; kernel && n != 0 {
		t.Errorf("%d packets of host-marked flows were queued to the daemon", n)
	} else if !kernel && n == 0 {
		t.Error("no packet was queued, yet the daemon decides host marks on this kernel")
	}
	if n := e.counter(e.w.B, "foreign"); n != foreign {
		t.Errorf("ISP B dropped %d packets with a foreign source", n-foreign)
	}
	if n := e.counter(e.w.A, "forwarded"); n != viaA {
		t.Errorf("%d packets left through ISP A", n-viaA)
	}
	if !kernel {
		// The daemon decided them: two TCP, two UDP and two ping flows.
		if n := e.metric(`rerouted_flows_total{decided_by="daemon"}`); n != 6 {
			t.Errorf("the daemon decided %v flows, want 6", n)
		}
		return
	}
	// Two TCP, two UDP and two ping flows, learned from the kernel's log.
	eventually(t, 2*time.Second, "six kernel decisions counted", func() bool {
		return e.metric(`rerouted_flows_total{decided_by="kernel"}`) == 6
	})
	if n := e.metric(`rerouted_syns_total`); n != 0 {
		t.Errorf("the daemon decided %v SYNs", n)
	}
	line, err := e.d.WaitFor("[NEW] tcp src=198.51.100.2", time.Second)
	if err != nil || !strings.HasSuffix(line, `rule="host mark" decided_by=kernel`) {
		t.Errorf("the kernel's TCP flow's debug line: %q (%v)", line, err)
	}
}

// kernelDecidesHere says whether e's daemon decides host marks in the
// kernel (kernelEnv checked that it does where expected).
func kernelDecidesHere(e *env) bool { return e.kernelDecides() }

// The same flows decided at the queue, as host_marks = "queue" asks: the
// daemon sees each one's first packet, and the wire is the same.
func TestHostMarksAtTheQueue(t *testing.T) {
	worldtest.Require(t)
	e := newEnv(t, "kernel", "")
	e.withMetrics("")
	if err := writeFile(e.cfg, strings.Replace(readFile(t, e.cfg), "[daemon]\n", "[daemon]\nhost_marks = \"queue\"\n", 1)); err != nil {
		t.Fatal(err)
	}
	e.hostMark("nft", 80)
	e.start()
	if _, err := e.d.WaitFor("host_marks=queue", 0); err != nil {
		t.Fatal(err)
	}
	for _, dst := range []netip.Addr{networld.ServerAddr, networld.Server6} {
		peer, err := e.w.FetchFrom(networld.DialOptions{Dst: dst, Port: 80})
		if err != nil || (peer.Addr() != networld.HostB && peer.Addr() != networld.HostB6) {
			t.Fatalf("tcp to %v: server saw %v (%v)", dst, peer, err)
		}
	}
	if n := e.metric(`rerouted_syns_total`); n != 2 {
		t.Errorf("the daemon decided %v SYNs, want 2", n)
	}
	if n := e.metric(`rerouted_flows_total{decided_by="kernel"}`); n != 0 {
		t.Errorf("the kernel decided %v flows with host_marks = \"queue\"", n)
	}
}

// A native socket bound to ISP B's address and a host-marked socket use
// the same port to the same server, in either order: both connections
// work, and the server sees two distinct tuples.
func TestHostMarkCollision(t *testing.T) {
	worldtest.Require(t)
	e := kernelEnv(t, "")
	for _, nativeFirst := range []bool{true, false} {
		port := uint16(41000)
		if !nativeFirst {
			port = 41001
		}
		dial := func(native bool) (*net.TCPConn, netip.AddrPort) {
			t.Helper()
			o := networld.DialOptions{Port: 80, BindPort: port, Bind: networld.HostA}
			if native {
				o.Bind = networld.HostB
			}
			c, err := e.w.Dial(o)
			if err != nil {
				t.Fatalf("native %v, first %v: %v", native, nativeFirst, err)
			}
			c.SetDeadline(time.Now().Add(10 * time.Second))
			peer, err := networld.Greeting(bufio.NewReader(c))
			if err != nil {
				t.Fatalf("native %v, first %v: %v", native, nativeFirst, err)
			}
			return c, peer
		}
		c1, p1 := dial(nativeFirst)
		c2, p2 := dial(!nativeFirst)
		if p1.Addr() != networld.HostB || p2.Addr() != networld.HostB || p1 == p2 {
			t.Errorf("native first %v: the server saw %v and %v: want two tuples of ISP B's address", nativeFirst, p1, p2)
		}
		// Both still carry data.
		for _, c := range []*net.TCPConn{c1, c2} {
			if err := sendCounted(c, 4096); err != nil {
				t.Errorf("native first %v: %v", nativeFirst, err)
			}
			c.Close()
		}
	}
	if !kernelDecidesHere(e) {
		return // the daemon checked the wire itself (kernelEnv checked why)
	}
	if n := e.metric(`rerouted_kernel_moved_total`); n != 1 {
		t.Errorf("kernel decisions moved to another port: %v, want 1 (the native socket came first once)", n)
	}
}

// A kernel-decided TCP connection idle for longer than every timeout the
// daemon uses (idle_timeout 2s, gc_interval 200ms) still gets the
// server's next reply.
func TestKernelDecidedIdle(t *testing.T) {
	worldtest.Require(t)
	e := kernelEnv(t, "")
	c, err := e.w.Dial(networld.DialOptions{Port: 80})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := bufio.NewReader(c)
	peer, err := networld.Greeting(r)
	if err != nil || peer.Addr() != networld.HostB {
		t.Fatalf("server saw %v (%v)", peer, err)
	}
	time.Sleep(5 * time.Second)
	if err := sendCounted(c, 1<<20); err != nil {
		t.Fatalf("after 5 s idle: %v", err)
	}
}

// sendCounted sends n bytes on a connection whose greeting was read,
// half-closes it, and checks the server's count of what it received.
func sendCounted(c *net.TCPConn, n int) error {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write(make([]byte, n)); err != nil {
		return fmt.Errorf("send: %w", err)
	}
	if err := c.CloseWrite(); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read the server's count: %w", err)
	}
	if count, _, _ := strings.Cut(strings.TrimSpace(line), " "); count != fmt.Sprint(n) {
		return fmt.Errorf("the server received %s bytes, want %d", count, n)
	}
	return nil
}

// One root process opens 20,000 host-marked connections as fast as it
// can, with the default configuration: every one is translated, ISP B
// drops nothing, and at least 99% queue no packet; then, their sockets
// closed and their TIME_WAIT ended, the kernel's elements are gone. Half
// the workers talk to a server that closes first, so that their sockets
// leave no TIME_WAIT, and each reuses 250 source ports in turn (outside
// the ephemeral range, which the other half holds in TIME_WAIT): a port
// comes round again within a second, as the kernel's ephemeral ports do
// on a host that opens thousands of connections a second to one server.
// A new socket on a tuple whose elements outlived its old socket would be
// sent to the daemon.
func TestKernelDecidedRateAndLifetime(t *testing.T) {
	worldtest.Require(t)
	e := kernelEnv(t, "")
	srv, err := e.w.Serve(80)
	if err != nil {
		t.Fatal(err)
	}
	if err := e.w.Host.Nft(fmt.Sprintf("add rule inet hostmark output tcp dport 81 meta mark set %d\n", networld.MarkB)); err != nil {
		t.Fatal(err)
	}
	var firstSaw, firstWrong atomic.Int64
	closesFirst, err := e.w.ServeFunc(81, func(c net.Conn) {
		firstSaw.Add(1)
		if netip.MustParseAddrPort(c.RemoteAddr().String()).Addr() != networld.HostB {
			firstWrong.Add(1)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer closesFirst.Close()
	before := len(srv.Peers())
	queued, foreign := e.queued(), e.counter(e.w.B, "foreign")
	const n, par = 20000, 8
	var failed, wrong atomic.Int64
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < par; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < n/par; i++ {
				if w%2 == 1 {
					// The server closes first: read to its FIN, then close.
					err := e.w.Host.Do(func() error {
						port := uint16(20000 + w/2*250 + i%250) // below the ephemeral ports
						c, err := e.w.Dial(networld.DialOptions{Port: 81, BindPort: port, Timeout: 5 * time.Second})
						if err != nil {
							return err
						}
						defer c.Close()
						c.SetDeadline(time.Now().Add(5 * time.Second))
						_, err = io.Copy(io.Discard, c)
						return err
					})
					if err != nil && failed.Add(1) == 1 {
						t.Logf("the first failure: %v", err)
					}
					continue
				}
				peer, err := e.w.Fetch(80, 5*time.Second)
				switch {
				case err != nil:
					failed.Add(1)
				case peer.Addr() != networld.HostB:
					wrong.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("%d connections in %v", n, time.Since(start).Round(time.Millisecond))
	if failed.Load()+wrong.Load()+firstWrong.Load() != 0 {
		t.Errorf("of %d host-marked connections %d failed and %d left with another source", n, failed.Load(), wrong.Load()+firstWrong.Load())
	}
	if got := len(srv.Peers()) - before + int(firstSaw.Load()); got != n {
		t.Errorf("the servers saw %d connections, want %d", got, n)
	}
	if d := e.counter(e.w.B, "foreign"); d != foreign {
		t.Errorf("ISP B dropped %d packets with a foreign source", d-foreign)
	}
	if !kernelDecidesHere(e) {
		return // the daemon decided them (kernelEnv checked why)
	}
	// What reached the daemon is exactly the SYNs of tuples that had
	// elements already (a SYN of such a tuple is the daemon's: a
	// retransmission, or a new socket on a tuple whose old socket just
	// ended, told apart by its cookie); none was an exception of another
	// kind.
	q := e.queued() - queued
	known := max(0, e.metric(`rerouted_kernel_exceptions_total{reason="known_tuple"}`))
	t.Logf("packets queued: %d (%.2f%% of the connections; SYNs of tuples with elements: %v, of which retransmissions: %v); kernel decisions: %v; daemon translations: %v",
		q, 100*float64(q)/n, known, e.metric(`rerouted_retransmitted_syns_total`),
		e.metric(`rerouted_flows_total{decided_by="kernel"}`), e.metric(`rerouted_flows_total{decided_by="daemon"}`))
	if float64(q) != known {
		t.Errorf("%d packets were queued to the daemon, %v of them SYNs of tuples with elements", q, known)
	}
	if q > n/100 {
		t.Errorf("%d of %d host-marked connections queued a packet: the target is at most 1%%", q, n)
	}
	// The flows of the sockets that closed last (no TIME_WAIT) ended as
	// the kernel announced their end, not by the sweep: all but those
	// whose end was announced in the instant between the learner's
	// lookup and its entering the flow, held to the same 1%.
	if c := e.metric("rerouted_tcp_socket_closed_total"); c < 0.99*n/2 {
		t.Errorf("rerouted_tcp_socket_closed_total is %v, want at least 99%% of %d", c, n/2)
	}
	for _, r := range []string{"wire_taken", "other"} {
		if v := e.metric(fmt.Sprintf(`rerouted_kernel_exceptions_total{reason=%q}`, r)); v > 0 {
			t.Errorf("kernel exceptions %s: %v", r, v)
		}
	}
	eventually(t, 10*time.Second, "every kernel decision learned", func() bool {
		return e.metric(`rerouted_flows_total{decided_by="kernel"}`)+max(0, e.metric(`rerouted_flows_total{decided_by="daemon"}`)) >= n
	})
	if !e.endTimeWait(networld.ServerAddr.String()) {
		t.Log("TIME_WAIT lasts 60 s on this kernel: waiting it out")
	}
	eventually(t, 75*time.Second, "the closed connections' elements removed", func() bool {
		return e.elements("tcp_out4") == 0 && e.elements("tcp_in4") == 0
	})
}
