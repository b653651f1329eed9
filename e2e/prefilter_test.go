package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
)

// Only what the policy concerns reaches the daemon. With one rule for TCP
// 8080 (and host marks honoured): 1,000 connections to 8081 and 1,000
// fresh-socket UDP exchanges queue nothing and leave no element; 8080 and
// host-marked traffic are still translated; a uid rule lets other users'
// connections through unqueued; and a reload that adds a rule for 8081
// makes 8081 translated at once, with no connection slipping through
// while a loop keeps connecting.
func TestPrefilter(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, `
[[rule]]
name = "api"
uplink = "isp-b"
protocol = "tcp"
dport = [8080]

[[rule]]
name = "only uid 4321"
uplink = "isp-b"
uid = 4321
dport = [8082]
`)
		for _, port := range []uint16{8081, 8082} {
			if _, err := e.w.Serve(port); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := e.w.ServeUDP(53); err != nil {
			t.Fatal(err)
		}
		e.hostMark("nft", 80)
		e.start()

		before := e.queued()
		for i := 0; i < 1000; i++ {
			if peer, err := e.w.Fetch(8081, 3*time.Second); err != nil || peer.Addr() != networld.HostA {
				t.Fatalf("8081, connection %d: server saw %v, err %v", i, peer, err)
			}
		}
		dns := netip.AddrPortFrom(networld.ServerAddr, 53)
		for i := 0; i < 1000; i++ {
			u, err := e.w.UDPSocket(dns, true, netip.AddrPort{})
			if err != nil {
				t.Fatal(err)
			}
			p, err := networld.AskUDP(u, dns, "q", 2*time.Second)
			u.Close()
			if err != nil || p.Addr() != networld.HostA {
				t.Fatalf("udp exchange %d: server saw %v, err %v", i, p, err)
			}
		}
		// Root's connections to the uid rule's port are not queued either.
		for i := 0; i < 50; i++ {
			if peer, err := e.w.Fetch(8082, 3*time.Second); err != nil || peer.Addr() != networld.HostA {
				t.Fatalf("8082 as root: server saw %v, err %v", peer, err)
			}
		}
		if n := e.queued() - before; n != 0 {
			t.Errorf("traffic no rule concerns queued %d packets", n)
		}
		if n := len(e.flows()); n != 0 {
			t.Errorf("%d flows for traffic no rule concerns", n)
		}
		if dp == "kernel" {
			if n := e.elements("udp_pass4"); n != 0 {
				t.Errorf("%d pass elements", n)
			}
		}
		// What the policy concerns still is: the rule, the host's mark,
		// and the uid rule for its user.
		for _, port := range []uint16{8080, 80} {
			if peer, err := e.w.Fetch(port, 3*time.Second); err != nil || peer.Addr() != networld.HostB {
				t.Errorf("port %d: server saw %v, err %v", port, peer, err)
			}
		}
		prog := program(t, filepath.Join(publicDir(t), "bin"), "client4321")
		if peer := e.connect(prog, 8082, runOpts{uid: 4321}); peer.Addr() != networld.HostB {
			t.Errorf("8082 as uid 4321: server saw %v", peer)
		}
		if out, err := e.w.Host.Run("nft", "list", "chain", "inet", "rerouted", "filter_syn"); err != nil ||
			!strings.Contains(out, "th dport 8080") || !strings.Contains(out, "th dport 8082 meta skuid 4321") {
			t.Errorf("filter_syn does not read as the policy (%v):\n%s", err, out)
		}

		// A reload adds a rule for 8081 while a loop connects to it.
		type result struct {
			start time.Time
			peer  netip.Addr
		}
		var mu sync.Mutex
		var results []result
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				start := time.Now()
				peer, err := e.w.Fetch(8081, 3*time.Second)
				if err != nil {
					t.Errorf("8081 during the reload: %v", err)
					return
				}
				mu.Lock()
				results = append(results, result{start, peer.Addr()})
				mu.Unlock()
			}
		}()
		time.Sleep(200 * time.Millisecond)
		e.writeConfig(`
[[rule]]
name = "api"
uplink = "isp-b"
protocol = "tcp"
dport = [8080, 8081, 8083] # not one range: a set
`)
		e.d.Signal(syscall.SIGHUP)
		line, err := e.d.WaitFor("msg=reloaded", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		reloaded := time.Now()
		time.Sleep(300 * time.Millisecond)
		close(stop)
		wg.Wait()
		var late, lateUntranslated int
		for _, r := range results {
			if r.start.After(reloaded) {
				late++
				if r.peer != networld.HostB {
					lateUntranslated++
				}
			}
		}
		if late == 0 || lateUntranslated != 0 {
			t.Errorf("of %d connections to 8081 started after %q, %d left untranslated", late, line, lateUntranslated)
		}
		t.Logf("%s: %d connections during the reload, %d after it, all of those translated", dp, len(results), late)
		if peer, err := e.w.Fetch(8081, 3*time.Second); err != nil || peer.Addr() != networld.HostB {
			t.Errorf("8081 after the reload: server saw %v, err %v", peer, err)
		}
		// One generation of prefilter sets: the reload's (here its one
		// set, of the rule with a list of ports).
		out, _ := e.w.Host.Run("nft", "list", "table", "inet", "rerouted")
		gens := map[string]bool{}
		for _, m := range regexp.MustCompile(`set (f[0-9]+)_`).FindAllStringSubmatch(out, -1) {
			gens[m[1]] = true
		}
		if len(gens) != 1 {
			t.Errorf("prefilter sets of %d generations, want the reload's only:\n%s", len(gens), out)
		}
	})
}

var _ = fmt.Sprint

// on_failure = "closed": while no daemon runs (it was killed), traffic the
// policy concerns (a rule's TCP and UDP) never leaves through ISP A; it
// waits, and completes through ISP B once a new daemon runs. A host-marked
// connection needs no daemon: the kernel decides it, through ISP B.
// Traffic no rule concerns works throughout.
func TestFailClosed(t *testing.T) {
	e := newEnv(t, "kernel", "")
	e.writeConfig(webRule + `
[[rule]]
name = "dns"
uplink = "isp-b"
protocol = "udp"
dport = [53]
`)
	cfg, err := os.ReadFile(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := writeFile(e.cfg, strings.Replace(string(cfg), "[daemon]\n", "[daemon]\non_failure = \"closed\"\n", 1)); err != nil {
		t.Fatal(err)
	}
	udp, err := e.w.ServeUDP(53)
	if err != nil {
		t.Fatal(err)
	}
	srv80, err := e.w.Serve(80)
	if err != nil {
		t.Fatal(err)
	}
	srv8081, err := e.w.Serve(8081)
	if err != nil {
		t.Fatal(err)
	}
	e.hostMark("nft", 8081)
	e.start()
	if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostB {
		t.Fatalf("before: server saw %v, err %v", peer, err)
	}

	e.d.Kill()
	killed := time.Now()
	type result struct {
		peer netip.AddrPort
		err  error
		at   time.Time
	}
	pending := map[uint16]chan result{}
	for _, port := range []uint16{80, 8081} {
		ch := make(chan result, 1)
		pending[port] = ch
		go func() {
			peer, err := e.w.Fetch(port, 15*time.Second)
			ch <- result{peer, err, time.Now()}
		}()
	}
	dns := netip.AddrPortFrom(networld.ServerAddr, 53)
	u, err := e.w.UDPSocket(dns, true, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	udpDone := make(chan result, 1)
	go func() {
		for {
			p, err := networld.AskUDP(u, dns, "q", 300*time.Millisecond)
			if err == nil {
				udpDone <- result{p, nil, time.Now()}
				return
			}
		}
	}()
	// Unconcerned traffic meanwhile.
	if peer, err := e.w.Fetch(8080, 3*time.Second); err != nil || peer.Addr() != networld.HostA {
		t.Errorf("unconcerned traffic while no daemon runs: server saw %v, err %v", peer, err)
	}
	select {
	case r := <-pending[8081]:
		if r.err != nil || r.peer.Addr() != networld.HostB {
			t.Errorf("host-marked port 8081 while no daemon ran: server saw %v, err %v; want ISP B's address, decided by the kernel", r.peer, r.err)
		}
		delete(pending, 8081)
	case <-time.After(1500 * time.Millisecond):
		t.Error("host-marked port 8081 did not complete while no daemon ran: the kernel decides it")
	}
	for port, ch := range pending {
		select {
		case r := <-ch:
			t.Fatalf("port %d completed while no daemon ran: %v, %v", port, r.peer, r.err)
		default:
		}
	}
	select {
	case r := <-udpDone:
		t.Fatalf("udp answered while no daemon ran: %v", r.peer)
	default:
	}

	e.start()
	restarted := time.Now()
	for port, ch := range pending {
		r := <-ch
		if r.err != nil || r.peer.Addr() != networld.HostB {
			t.Errorf("port %d after the restart: server saw %v, err %v", port, r.peer, r.err)
		}
		t.Logf("port %d connected %v after the kill, %v after the restart", port, r.at.Sub(killed).Round(time.Millisecond), r.at.Sub(restarted).Round(time.Millisecond))
	}
	select {
	case r := <-udpDone:
		if r.peer.Addr() != networld.HostB {
			t.Errorf("udp after the restart: server saw %v", r.peer)
		}
	case <-time.After(5 * time.Second):
		t.Error("udp never answered after the restart")
	}
	for name, peers := range map[string][]netip.AddrPort{"80": srv80.Peers(), "8081": srv8081.Peers(), "udp 53": udp.Peers()} {
		for _, p := range peers {
			if p.Addr() == networld.HostA {
				t.Errorf("server %s saw %v: concerned traffic left through ISP A", name, p)
			}
		}
	}
}

// A local user floods the queue with new flows the policy concerns: a
// burst of 10,000 datagrams from 256 sockets, and 4 × 5,000 connections
// started and abandoned to a filtered port. Meanwhile root makes 3,000
// rule-matched TCP connections, 3,000 host-marked ones and 3,000 UDP
// exchanges, with the default
// budget: none of root's leaves untranslated, with on_failure "open" or
// "closed". The flooder's excess is counted against its uid alone and goes
// to the overflow queue, where it is decided or dropped, never sent
// untranslated: ISP A sees of the flood exactly what the daemon failed
// open (sockets the flooder closed before the daemon looked).
func TestLocalFlood(t *testing.T) {
	worldtest.Require(t) // its subtests need root: without it the test must skip, not pass
	for _, mode := range []string{"open", "closed"} {
		t.Run(mode, func(t *testing.T) {
			e := newEnv(t, "kernel", "")
			e.withMetrics(webRule + `
[[rule]]
name = "dns"
uplink = "isp-b"
protocol = "udp"
dport = [53, 5353]

[[rule]]
name = "discard"
uplink = "isp-b"
protocol = "tcp"
dport = [9]
`)
			cfg, err := os.ReadFile(e.cfg)
			if err != nil {
				t.Fatal(err)
			}
			// Root makes about 650 connections and as many UDP
			// exchanges a second here: within the default budget (1,000
			// a second of each), far below the floods.
			if err := writeFile(e.cfg, strings.Replace(string(cfg), "[daemon]\n", fmt.Sprintf("[daemon]\non_failure = %q\n", mode), 1)); err != nil {
				t.Fatal(err)
			}
			// Root's host-marked connections go to port 8081.
			if _, err := e.w.Serve(8081); err != nil {
				t.Fatal(err)
			}
			e.hostMark("nft", 8081)
			// Root asks port 53; the flood goes to 5353, a socket of its
			// own, so that its answers cannot crowd out root's.
			for _, port := range []uint16{53, 5353} {
				if _, err := e.w.ServeUDP(port); err != nil {
					t.Fatal(err)
				}
			}
			// Port 9 is filtered on the internet; ISP A counts what the
			// host sends it of the flood.
			if err := e.w.Net.Nft("table inet filtered {\n\tchain input {\n\t\ttype filter hook input priority 0; policy accept;\n\t\ttcp dport 9 drop\n\t}\n}\n"); err != nil {
				t.Fatal(err)
			}
			if err := e.w.A.Nft(`table inet flood {
	counter syn9 {}
	counter udp53 {}
	chain forward {
		type filter hook forward priority -10; policy accept;
		iifname "cust" tcp dport 9 tcp flags & (syn | ack) == syn counter name "syn9"
		iifname "cust" udp dport 5353 counter name "udp53"
	}
}
`); err != nil {
				t.Fatal(err)
			}
			e.start()

			prog := program(t, filepath.Join(publicDir(t), "bin"), "flooder")
			flooders := make(chan error, 5)
			run := func(uid string, args ...string) {
				cmd := exec.Command("nsenter", append([]string{"--net=/run/netns/" + e.w.Host.Name, "--setuid", uid, "--setgid", uid, "--", prog}, args...)...)
				out, err := cmd.CombinedOutput()
				if err != nil {
					err = fmt.Errorf("%v: %s", err, out)
				}
				flooders <- err
			}
			// Two users: 4322 floods datagrams, 4321 connections.
			go run("4322", "-connect", "192.0.2.80:5353", "-flood-udp", "10000")
			for i := 0; i < 4; i++ {
				go run("4321", "-connect", "192.0.2.80:9", "-flood-connect", "5000")
			}

			var wrongTCP, wrongUDP, failedTCP, failedUDP, wrongMark, failedMark int
			dns := netip.AddrPortFrom(networld.ServerAddr, 53)
			for i := 0; i < 3000; i++ {
				// A host-marked connection: the kernel's to decide.
				if peer, err := e.w.Fetch(8081, 5*time.Second); err != nil {
					failedMark++
				} else if peer.Addr() != networld.HostB {
					wrongMark++
				}
				peer, err := e.w.Fetch(80, 5*time.Second)
				switch {
				case err != nil:
					failedTCP++
				case peer.Addr() != networld.HostB:
					wrongTCP++
				}
				u, err := e.w.UDPSocket(dns, true, netip.AddrPort{})
				if err != nil {
					t.Fatal(err)
				}
				p, err := networld.AskUDP(u, dns, "q", 2*time.Second)
				u.Close()
				switch {
				case err != nil:
					failedUDP++
				case p.Addr() != networld.HostB:
					wrongUDP++
				}
			}
			for i := 0; i < 5; i++ {
				if err := <-flooders; err != nil {
					t.Fatal(err)
				}
			}
			if wrongTCP+wrongUDP+wrongMark > 0 {
				t.Errorf("root's flows that left untranslated: %d TCP, %d UDP, %d host-marked", wrongTCP, wrongUDP, wrongMark)
			}
			if failedTCP+failedUDP+failedMark > 0 {
				t.Errorf("root's flows that failed: %d TCP, %d UDP, %d host-marked", failedTCP, failedUDP, failedMark)
			}
			time.Sleep(500 * time.Millisecond)
			over := e.metric(`rerouted_uid_over_budget_total{uid="4321"}`)
			overUDP := e.metric(`rerouted_uid_over_budget_total{uid="4322"}`)
			if over <= 0 {
				t.Errorf("the connection flood's excess was not counted: uid 4321 %v", over)
			}
			overUDP = max(0, overUDP) // datagrams of a decided tuple need no queue: it may stay within its budget
			if root := e.metric(`rerouted_uid_over_budget_total{uid="0"}`); root != -1 {
				t.Errorf("root was counted over its budget: %v", root)
			}
			counter := func(name string) uint64 {
				t.Helper()
				out, err := e.w.A.Run("nft", "list", "counter", "inet", "flood", name)
				if err != nil {
					t.Fatal(err)
				}
				var v uint64
				fmt.Sscanf(out[strings.Index(out, "packets ")+len("packets "):], "%d", &v)
				return v
			}
			// Each SYN is a flow: ISP A saw exactly the flows that failed
			// open in the daemon (their sockets were closed before it
			// could look them up), or in a full main queue; none of those
			// over the budget, which went to the overflow queue.
			failedOpen := 0.0
			for _, r := range []string{"no_socket", "socket_lookup", "no_route", "queue_full"} {
				failedOpen += max(0, e.metric(fmt.Sprintf(`rerouted_failed_open_total{reason=%q}`, r)))
			}
			syns, datagrams := counter("syn9"), counter("udp53")
			t.Logf("%s: over budget: uid 4321 %v connections, uid 4322 %v datagrams; %v more failed open in the daemon; ISP A saw %d SYNs and %d datagrams of the floods",
				mode, over, overUDP, failedOpen, syns, datagrams)
			switch {
			case mode == "open" && float64(syns) > failedOpen:
				// (A burst of SYNs can lose a few in the veth's queue on
				// the way to ISP A: it may see fewer, never more.)
				t.Errorf("ISP A saw %d SYNs of the flood; the daemon failed %v open, and the %v over budget must not leave untranslated", syns, failedOpen, over)
			case mode == "open" && float64(datagrams) > failedOpen:
				t.Errorf("ISP A saw %d datagrams of the flood; the daemon failed %v open, and the %v over budget must not leave untranslated", datagrams, failedOpen, overUDP)
			case mode == "closed" && syns+datagrams != 0:
				t.Errorf("on_failure = closed, yet ISP A saw %d SYNs and %d datagrams of the floods", syns, datagrams)
			}
			if _, err := e.d.WaitFor(`msg="a user opened new flows faster than its budget`, 3*time.Second); err != nil {
				t.Error(err)
			}
		})
	}
}
