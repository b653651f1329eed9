package e2e

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
)

// hostMarkDatagrams marks UDP to the given ports and ICMP/ICMPv6 echo
// requests for ISP B, with the host's own nft rule.
func (e *env) hostMarkDatagrams(ports ...uint16) {
	e.t.Helper()
	var ps []string
	for _, p := range ports {
		ps = append(ps, strconv.Itoa(int(p)))
	}
	err := e.w.Host.Nft(fmt.Sprintf(`table inet hostmark {
	chain output {
		type route hook output priority mangle; policy accept;
		udp dport { %s } meta mark set %d
		icmp type echo-request meta mark set %d
		icmpv6 type echo-request meta mark set %d
	}
}
`, strings.Join(ps, ", "), networld.MarkB, networld.MarkB, networld.MarkB))
	if err != nil {
		e.t.Fatal(err)
	}
}

// queued is the number of packets the host has queued to userspace so far,
// over all queues (/proc/net/netfilter/nfnetlink_queue: id_sequence).
func (e *env) queued() uint64 {
	e.t.Helper()
	out, err := e.w.Host.Run("cat", "/proc/net/netfilter/nfnetlink_queue")
	if err != nil {
		e.t.Fatal(err)
	}
	var n uint64
	for _, line := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(line)
		if len(f) < 8 {
			e.t.Fatalf("nfnetlink_queue line %q", line)
		}
		v, err := strconv.ParseUint(f[7], 10, 64)
		if err != nil {
			e.t.Fatal(err)
		}
		n += v
	}
	return n
}

// udpFlows counts the daemon's translated UDP flows.
func (e *env) udpFlows() int {
	n := 0
	for _, f := range e.flows() {
		if f.Proto == "udp" {
			n++
		}
	}
	return n
}

// UDP request/response via ISP B: connected, unconnected from a wildcard
// and from an address-bound socket, IPv4 and IPv6, decided by a host mark
// and by a TOML rule. After the first datagram the kernel holds the
// decision: no further packet of the tuple reaches userspace with the
// kernel datapath, translated or not. Flows end with their socket, or when
// idle; an ICMP error about a translated datagram reaches its socket.
func TestUDPRequestResponse(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, `
[[rule]]
name = "mdns-rule"
uplink = "isp-b"
protocol = "udp"
dport = [5353]
`)
		for _, port := range []uint16{53, 123, 5353} {
			if _, err := e.w.ServeUDP(port); err != nil {
				t.Fatal(err)
			}
		}
		e.hostMarkDatagrams(53, 9)
		server := func(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

		// Without rerouted the marked datagram leaves ISP B with ISP A's
		// address and is dropped.
		dropped := e.counter(e.w.B, "foreign")
		c, err := e.w.UDPSocket(server(networld.ServerAddr, 53), true, netip.AddrPort{})
		if err != nil {
			t.Fatal(err)
		}
		if peer, err := networld.AskUDP(c, server(networld.ServerAddr, 53), "q", time.Second); err == nil {
			t.Fatalf("marked datagram answered without rerouted (server saw %v)", peer)
		}
		c.Close()
		if e.counter(e.w.B, "foreign") == dropped {
			t.Fatal("ISP B's drop counter did not rise for the untranslated datagram")
		}

		e.start()
		dropped = e.counter(e.w.B, "foreign")
		cases := []struct {
			name    string
			dst     netip.AddrPort
			connect bool
			bind    netip.AddrPort
			want    netip.Addr
			rule    string
		}{
			{"connected", server(networld.ServerAddr, 53), true, netip.AddrPort{}, networld.HostB, "host mark"},
			{"connected IPv6", server(networld.Server6, 53), true, netip.AddrPort{}, networld.HostB6, "host mark"},
			{"unconnected", server(networld.ServerAddr, 53), false, netip.AddrPort{}, networld.HostB, "host mark"},
			{"unconnected IPv6", server(networld.Server6, 53), false, netip.AddrPort{}, networld.HostB6, "host mark"},
			{"address-bound", server(networld.ServerAddr, 53), false, netip.AddrPortFrom(networld.HostA, 0), networld.HostB, "host mark"},
			{"TOML rule", server(networld.ServerAddr, 5353), false, netip.AddrPort{}, networld.HostB, "mdns-rule"},
			{"unmatched", server(networld.ServerAddr, 123), false, netip.AddrPort{}, networld.HostA, ""},
			{"unmatched IPv6", server(networld.Server6, 123), true, netip.AddrPort{}, networld.HostA6, ""},
		}
		socks := map[string]*net.UDPConn{}
		for _, c := range cases {
			s, err := e.w.UDPSocket(c.dst, c.connect, c.bind)
			if err != nil {
				t.Fatalf("%s: %v", c.name, err)
			}
			defer s.Close()
			socks[c.name] = s
			var first netip.AddrPort
			for i := 0; i < 3; i++ {
				peer, err := networld.AskUDP(s, c.dst, fmt.Sprintf("%s %d", c.name, i), 2*time.Second)
				if err != nil || peer.Addr() != c.want {
					t.Fatalf("%s, datagram %d: server saw %v (err %v), want %v", c.name, i, peer, err, c.want)
				}
				if i == 0 {
					first = peer
				} else if peer != first {
					t.Fatalf("%s: the server saw %v, then %v: the translation changed", c.name, first, peer)
				}
			}
			// The decision is the kernel's now: twenty more exchanges
			// queue nothing, unless every packet of a translated flow
			// goes through the daemon (the userspace datapath).
			before := e.queued()
			for i := 0; i < 20; i++ {
				if _, err := networld.AskUDP(s, c.dst, "again", 2*time.Second); err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
			}
			if n := e.queued() - before; n != 0 && (dp == "kernel" || c.rule == "") {
				t.Errorf("%s: %d packets reached userspace after the decision", c.name, n)
			}
			// Listed while in use: checked now, not after the loop, since on
			// a slow machine (a TCG guest) the first cases' flows may be
			// idle (2s) by then.
			// (The kernel decides a host-marked flow and the daemon learns
			// of it within its log's batch, 10 ms: wait that long, not more.)
			local := s.LocalAddr().(*net.UDPAddr).AddrPort()
			listed := false
			for deadline := time.Now().Add(100 * time.Millisecond); ; time.Sleep(10 * time.Millisecond) {
				listed = false
				for _, f := range e.flows() {
					listed = listed || f.Proto == "udp" && f.Original.Sport == local.Port() && f.Original.Dst == c.dst.Addr()
				}
				if listed || c.rule == "" || time.Now().After(deadline) {
					break
				}
			}
			if listed != (c.rule != "") {
				t.Errorf("%s: translated flow listed: %v, want %v: %+v", c.name, listed, c.rule != "", e.flows())
			}
			if c.rule != "" {
				line := fmt.Sprintf(`udp src=%s dst=%s sport=%d dport=%d mark=100 => src=%s sport=%d dev=hb uid=0 pid=`,
					map[bool]netip.Addr{true: networld.HostA6, false: networld.HostA}[c.want.Is6()], c.dst.Addr(), local.Port(), c.dst.Port(), c.want, first.Port())
				if _, err := e.d.WaitFor("[NEW] "+line, time.Second); err != nil {
					t.Errorf("%s: %v", c.name, err)
				}
				if _, err := e.d.WaitFor(fmt.Sprintf(`rule=%q`, c.rule), time.Second); err != nil {
					t.Errorf("%s: %v", c.name, err)
				}
			}
		}
		if n := e.counter(e.w.B, "foreign"); n != dropped {
			t.Errorf("ISP B dropped %d packets with a foreign source", n-dropped)
		}

		// An ICMP error about a translated datagram (port 9 is closed)
		// reaches the connected socket as ECONNREFUSED.
		closed := server(networld.ServerAddr, 9)
		s, err := e.w.UDPSocket(closed, true, netip.AddrPort{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := networld.AskUDP(s, closed, "anyone?", 2*time.Second); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("datagram to a closed port: %v, want ECONNREFUSED", err)
		}
		s.Close()

		// Lifetimes. A closed connected socket's flow goes at the next
		// sweep; the others stay while used, and go when idle (2s here).
		socks["connected"].Close()
		eventually(t, 3*time.Second, "the closed socket's flow to go", func() bool {
			for _, f := range e.flows() {
				if f.Proto == "udp" && f.Original.Dst == networld.ServerAddr && f.Original.Dport == 53 && f.Original.Src == networld.HostA && socks["unconnected"].LocalAddr().(*net.UDPAddr).Port != int(f.Original.Sport) && socks["address-bound"].LocalAddr().(*net.UDPAddr).Port != int(f.Original.Sport) {
					return false
				}
			}
			return true
		})
		busy := socks["unconnected"]
		for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(300 * time.Millisecond) {
			if _, err := networld.AskUDP(busy, server(networld.ServerAddr, 53), "busy", 2*time.Second); err != nil {
				t.Fatal(err)
			}
		}
		local := busy.LocalAddr().(*net.UDPAddr).AddrPort()
		flows := e.flows()
		if len(flows) != 1 || flows[0].Original.Sport != local.Port() {
			t.Fatalf("after 3s, want only the busy socket's flow (sport %d); have %+v", local.Port(), flows)
		}
		eventually(t, 5*time.Second, "every UDP flow to end when idle", func() bool { return e.udpFlows() == 0 })
		for _, set := range []string{"udp_%s4", "udp_%s6", "udp_pass4", "udp_pass6"} {
			name := set
			if strings.Contains(set, "%s") {
				name = fmt.Sprintf(set, map[string]string{"kernel": "out", "userspace": "uout"}[dp])
			}
			if n := e.elements(name); n != 0 {
				t.Errorf("%s still holds %d elements", name, n)
			}
		}
	})
}

// Ping marked for ISP B by a host rule, IPv4 and IPv6, from a ping socket
// and from a raw socket: the server sees ISP B's address, the replies come
// back, and the flows end when idle (ping sockets are not in sock_diag).
func TestPingViaISPB(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, "")
		e.hostMarkDatagrams(53)
		// The server counts the echo requests it receives from ISP B's
		// addresses.
		if err := e.w.Net.Nft(fmt.Sprintf(`table inet seen {
	counter b4 {}
	counter b6 {}
	chain input {
		type filter hook input priority 0; policy accept;
		icmp type echo-request ip saddr %s counter name b4
		icmpv6 type echo-request ip6 saddr %s counter name b6
	}
}
`, networld.HostB, networld.HostB6)); err != nil {
			t.Fatal(err)
		}
		seen := func(name string) uint64 {
			out, err := e.w.Net.Run("nft", "list", "counter", "inet", "seen", name)
			if err != nil {
				t.Fatal(err)
			}
			m := regexp.MustCompile(`packets (\d+)`).FindStringSubmatch(out)
			if m == nil {
				t.Fatalf("no count in %q", out)
			}
			n, _ := strconv.ParseUint(m[1], 10, 64)
			return n
		}

		dropped := e.counter(e.w.B, "foreign")
		if _, err := e.w.Ping(networld.ServerAddr, networld.PingRaw, 999, time.Second); err == nil {
			t.Fatal("marked ping answered without rerouted")
		}
		if e.counter(e.w.B, "foreign") == dropped {
			t.Fatal("ISP B's drop counter did not rise for the untranslated echo")
		}

		e.start()
		dropped = e.counter(e.w.B, "foreign")
		for i, c := range []struct {
			dst     netip.Addr
			kind    string
			counter string
			src     netip.Addr
			want    netip.Addr
		}{
			{networld.ServerAddr, networld.PingSocket, "b4", networld.HostA, networld.HostB},
			{networld.ServerAddr, networld.PingRaw, "b4", networld.HostA, networld.HostB},
			{networld.Server6, networld.PingSocket, "b6", networld.HostA6, networld.HostB6},
			{networld.Server6, networld.PingRaw, "b6", networld.HostA6, networld.HostB6},
		} {
			before := seen(c.counter)
			id, err := e.w.Ping(c.dst, c.kind, uint16(4000+i), 2*time.Second)
			if err != nil {
				t.Fatalf("%s to %s: %v", c.kind, c.dst, err)
			}
			if n := seen(c.counter) - before; n != 1 {
				t.Errorf("%s to %s: the server saw %d echo requests from %s, want 1", c.kind, c.dst, n, c.want)
			}
			proto := "icmp"
			if c.dst.Is6() {
				proto = "icmpv6"
			}
			line := fmt.Sprintf(`[NEW] %s src=%s dst=%s id=%d mark=100 => src=%s dev=hb uid=0 rule="host mark"`, proto, c.src, c.dst, id, c.want)
			if _, err := e.d.WaitFor(line, time.Second); err != nil {
				t.Errorf("%s to %s: %v", c.kind, c.dst, err)
			}
			// The same identifier again: the cached translation.
			if c.kind == networld.PingRaw {
				if _, err := e.w.Ping(c.dst, c.kind, id, 2*time.Second); err != nil {
					t.Fatalf("%s to %s, again: %v", c.kind, c.dst, err)
				}
			}
		}
		if n := e.counter(e.w.B, "foreign"); n != dropped {
			t.Errorf("ISP B dropped %d packets with a foreign source", n-dropped)
		}
		eventually(t, 5*time.Second, "the echo flows to end when idle", func() bool { return len(e.flows()) == 0 })
	})
}

// IPv4 UDP may go without a checksum (zero), as tunnels often do: a
// translated flow's datagrams keep none, both ways, instead of getting a
// wrong one the receiver would drop.
func TestUDPWithoutChecksum(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, "")
		srv, err := e.w.ServeUDP(4789)
		if err != nil {
			t.Fatal(err)
		}
		if err := srv.NoChecksum(); err != nil {
			t.Fatal(err)
		}
		e.hostMarkDatagrams(4789)
		// ISP B counts the datagrams it forwards without a checksum.
		if err := e.w.B.Nft("table inet zc {\n\tcounter none {}\n\tchain count {\n\t\ttype filter hook forward priority 0; policy accept;\n\t\tudp checksum 0 counter name none\n\t}\n}\n"); err != nil {
			t.Fatal(err)
		}
		e.start()
		dst := netip.AddrPortFrom(networld.ServerAddr, 4789)
		c, err := e.w.UDPSocket(dst, true, netip.AddrPort{})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if err := networld.NoChecksum(c); err != nil {
			t.Fatal(err)
		}
		for i := 0; i < 3; i++ {
			peer, err := networld.AskUDP(c, dst, fmt.Sprint("no checksum ", i), 2*time.Second)
			if err != nil || peer.Addr() != networld.HostB {
				t.Fatalf("datagram %d: server saw %v, err %v; want %v", i, peer, err, networld.HostB)
			}
		}
		out, err := e.w.B.Run("nft", "list", "counter", "inet", "zc", "none")
		if err != nil {
			t.Fatal(err)
		}
		if m := regexp.MustCompile(`packets (\d+)`).FindStringSubmatch(out); m == nil || m[1] != "6" {
			t.Errorf("ISP B forwarded %v datagrams without a checksum, want 6 (three each way): %s", m, out)
		}
	})
}

// A UDP server on the host answers a peer from the address the peer asked,
// through the way it came, even when a rule matches the peer as a
// destination: the tuple the peer opened is learned in the kernel, so the
// answers pass untranslated and never reach the daemon.
func TestUDPServerOnHostAnswersAsAsked(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, `
[[rule]]
name = "everything to the server's network via isp-b"
uplink = "isp-b"
dst = ["192.0.2.0/24"]
`)
		// An echo server on the host, all addresses.
		var srv *net.UDPConn
		if err := e.w.Host.Do(func() (err error) { srv, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 5300}); return err }); err != nil {
			t.Fatal(err)
		}
		defer srv.Close()
		go func() {
			buf := make([]byte, 2048)
			for {
				n, peer, err := srv.ReadFromUDPAddrPort(buf)
				if err != nil {
					return
				}
				srv.WriteToUDPAddrPort(buf[:n], peer)
			}
		}()
		e.start()
		// The client on the internet asks the host at ISP A's address, with
		// a connected socket: an answer from any other address is dropped.
		var c *net.UDPConn
		if err := e.w.Net.Do(func() (err error) {
			c, err = net.DialUDP("udp4", nil, net.UDPAddrFromAddrPort(netip.AddrPortFrom(networld.HostA, 5300)))
			return err
		}); err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		before := e.queued()
		buf := make([]byte, 64)
		for i := 0; i < 5; i++ {
			c.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := c.Write([]byte(fmt.Sprint("query ", i))); err != nil {
				t.Fatal(err)
			}
			n, err := c.Read(buf)
			if err != nil || string(buf[:n]) != fmt.Sprint("query ", i) {
				t.Fatalf("answer %d: %q, %v (an answer from another address never reaches the connected socket)", i, buf[:n], err)
			}
		}
		if n := e.queued() - before; n != 0 {
			t.Errorf("%d of the server's answers went to the daemon", n)
		}
		if n := e.udpFlows(); n != 0 {
			t.Errorf("the server's answers became %d translated flows", n)
		}
	})
}

// A flood of spoofed datagrams from the internet fills the set of tuples
// the kernel learns for the host's UDP services. A legitimate client's
// tuple then is not learned, and its answers reach the daemon as new
// flows: they must still leave from the address the client asked. A
// local service's socket is decided by rules that name its owner only,
// never by one that names only destinations.
func TestUDPServerAnswersAsAskedUnderFlood(t *testing.T) {
	e := newEnv(t, "kernel", `
[[rule]]
name = "everything to the server's network via isp-b"
uplink = "isp-b"
dst = ["192.0.2.0/24"]
`)
	var srv *net.UDPConn
	if err := e.w.Host.Do(func() (err error) { srv, err = net.ListenUDP("udp4", &net.UDPAddr{Port: 5300}); return err }); err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	// Learned tuples live as long as idle_timeout: long enough here for
	// the flood to fill the set.
	cfg, err := os.ReadFile(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(e.cfg, []byte(strings.Replace(string(cfg), `idle_timeout = "2s"`, `idle_timeout = "60s"`, 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	client := netip.AddrPortFrom(networld.ServerAddr, 40000)
	go func() { // answers the legitimate client only: the flood needs no answers to fill the set
		buf := make([]byte, 2048)
		for {
			n, peer, err := srv.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			if peer == client {
				srv.WriteToUDPAddrPort(buf[:n], peer)
			}
		}
	}()
	e.start()

	// Datagrams to the service from random ports of one source, or of
	// random sources of the internet's range.
	flood := func(n int, oneSource bool) {
		t.Helper()
		err := e.w.Net.Do(func() error {
			fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_RAW, syscall.IPPROTO_RAW)
			if err != nil {
				return err
			}
			defer syscall.Close(fd)
			pkt := make([]byte, 28+4)
			dst := networld.HostA.As4()
			to := &syscall.SockaddrInet4{Addr: dst}
			x := uint32(12345)
			for i := 0; i < n; i++ {
				x = x*1664525 + 1013904223
				pkt[0], pkt[8], pkt[9] = 0x45, 64, syscall.IPPROTO_UDP
				binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
				src := byte(x >> 24)
				if oneSource {
					src = 66
				}
				copy(pkt[12:], []byte{192, 0, 2, src})
				copy(pkt[16:], dst[:])
				binary.BigEndian.PutUint16(pkt[20:], uint16(1024+x%60000))
				binary.BigEndian.PutUint16(pkt[22:], 5300)
				binary.BigEndian.PutUint16(pkt[24:], 12)
				binary.BigEndian.PutUint16(pkt[26:], 0) // no checksum
				if err := syscall.Sendto(fd, pkt, 0, to); err != nil {
					return fmt.Errorf("datagram %d: %w", i, err)
				}
				if i%64 == 63 { // as fast as the veth backlogs take them
					time.Sleep(time.Millisecond)
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	learned := func() int {
		t.Helper()
		out, err := e.w.Host.Run("nft", "list", "set", "inet", "rerouted", "udp_seen4")
		if err != nil {
			t.Fatal(err)
		}
		return strings.Count(out, " . ") / 3
	}

	// One source spraying ports learns no more than its budget.
	start := time.Now()
	flood(20000, true)
	if n, most := learned(), 1024+int(256*(time.Since(start).Seconds()+1)); n > most {
		t.Errorf("one source added %d tuples in %v; its budget is %d", n, time.Since(start).Round(time.Millisecond), most)
	}
	// 200,000 from many sources fill the set.
	flood(200000, false)
	if n := learned(); n < 60000 {
		t.Fatalf("the flood left %d tuples in udp_seen4: not full, the test shows nothing", n)
	}

	var c *net.UDPConn
	if err := e.w.Net.Do(func() (err error) {
		c, err = net.DialUDP("udp4", net.UDPAddrFromAddrPort(client), net.UDPAddrFromAddrPort(netip.AddrPortFrom(networld.HostA, 5300)))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	got := 0
	for i := 0; i < 20; i++ {
		c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.Write([]byte(fmt.Sprint("query ", i))); err != nil {
			t.Fatal(err)
		}
		if n, err := c.Read(buf); err == nil && string(buf[:n]) == fmt.Sprint("query ", i) {
			got++
		}
	}
	if got != 20 {
		t.Errorf("%d of 20 answers came from the address asked", got)
	}
	if n := e.udpFlows(); n != 0 {
		t.Errorf("the service's answers became %d translated flows", n)
	}
}
