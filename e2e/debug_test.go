package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
)

// The debug stream answers "why didn't my rule apply?": a new flow the
// daemon leaves alone gets one [PASS] line with the reason, once per flow,
// not per packet. --debug=KINDS prints only those kinds.
func TestDebugStreamPass(t *testing.T) {
	datapaths(t, func(t *testing.T, dp string) {
		e := newEnv(t, dp, `
[[rule]]
name = "web-b"
uplink = "isp-b"
protocol = "tcp"
dport = [8080]

[[rule]]
name = "mdns-b"
uplink = "isp-b"
protocol = "udp"
dport = [5353]

[[rule]]
name = "someone-else"
uplink = "isp-b"
process = ["no-such-program"]
dport = [8081, 53]
`)
		if _, err := e.w.Serve(8081); err != nil {
			t.Fatal(err)
		}
		for _, port := range []uint16{53, 5353} {
			if _, err := e.w.ServeUDP(port); err != nil {
				t.Fatal(err)
			}
		}
		d, err := e.w.StartDaemon(bin, e.cfg, nil, "--debug=new,pass")
		if err != nil {
			t.Fatal(err)
		}
		e.d = d
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("rerouted output:\n%s", d.Output())
			}
			d.Kill()
		})
		if err := d.WaitReady(); err != nil {
			t.Fatalf("%v\n%s", err, d.Output())
		}

		// 1. No rule matched: the process rule made the daemon look, and
		// the process was another.
		c, err := e.w.Dial(networld.DialOptions{Port: 8081})
		if err != nil {
			t.Fatal(err)
		}
		sport := c.LocalAddr().(interface{ AddrPort() netip.AddrPort }).AddrPort().Port()
		c.Close()
		want := fmt.Sprintf(`[PASS] tcp src=%s dst=%s sport=%d dport=8081 mark=0 uid=0 pid=`, networld.HostA, networld.ServerAddr, sport)
		line, err := d.WaitFor(want, 2*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(line, `rule="" reason="no rule matched"`) {
			t.Errorf("pass line %q: want the reason no rule matched", line)
		}

		// 2. The socket marks itself for ISP B (SO_MARK, as a VRF or a
		// VPN client does) and is bound to ISP B's address already:
		// nothing to translate. (A socket bound to the address without
		// the mark is translated: it gets the mark, which routes it out
		// ISP B, and keeps its address.)
		c, err = e.w.Dial(networld.DialOptions{Port: 8080, Bind: networld.HostB, Mark: networld.MarkB})
		if err != nil {
			t.Fatal(err)
		}
		sport = c.LocalAddr().(interface{ AddrPort() netip.AddrPort }).AddrPort().Port()
		c.Close()
		want = fmt.Sprintf(`[PASS] tcp src=%s dst=%s sport=%d dport=8080 mark=100 uid=0`, networld.HostB, networld.ServerAddr, sport)
		if dp == "kernel" {
			// The kernel, which decides host marks, lets such a socket's
			// packets go as they are: the daemon never sees them.
			if line, err = d.WaitFor(want, 500*time.Millisecond); err == nil {
				t.Errorf("the daemon saw a socket on its uplink already: %q", line)
			}
		} else {
			if line, err = d.WaitFor(want+" pid=", 2*time.Second); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(line, `rule="host mark" reason="the socket's source already is the uplink's address"`) {
				t.Errorf("pass line %q: want the host mark and its reason", line)
			}
		}

		// 3. A UDP tuple left alone: one line however many datagrams.
		s, err := e.w.UDPSocket(netip.AddrPortFrom(networld.ServerAddr, 53), true, netip.AddrPort{})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		for i := 0; i < 5; i++ {
			if peer, err := networld.AskUDP(s, netip.AddrPortFrom(networld.ServerAddr, 53), "q", 2*time.Second); err != nil || peer.Addr() != networld.HostA {
				t.Fatalf("datagram %d: server saw %v, err %v", i, peer, err)
			}
		}
		uport := s.LocalAddr().(interface{ AddrPort() netip.AddrPort }).AddrPort().Port()
		want = fmt.Sprintf(`[PASS] udp src=%s dst=%s sport=%d dport=53 mark=0`, networld.HostA, networld.ServerAddr, uport)
		if _, err := d.WaitFor(want, 2*time.Second); err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(d.Output(), want); n != 1 {
			t.Errorf("%d pass lines for one UDP tuple, want 1", n)
		}

		// 4. A translated flow still gets its [NEW] line. When its socket
		// closes, the sweep ends it, which --debug would show as a
		// [DESTROY] line and a DEBUG "socket gone" line: not asked for.
		m, err := e.w.UDPSocket(netip.AddrPortFrom(networld.ServerAddr, 5353), true, netip.AddrPort{})
		if err != nil {
			t.Fatal(err)
		}
		if peer, err := networld.AskUDP(m, netip.AddrPortFrom(networld.ServerAddr, 5353), "q", 2*time.Second); err != nil || peer.Addr() != networld.HostB {
			t.Fatalf("port 5353: server saw %v, err %v", peer, err)
		}
		if _, err := d.WaitFor(`[NEW] udp src=`+networld.HostA.String(), 2*time.Second); err != nil {
			t.Fatal(err)
		}
		m.Close()
		eventually(t, 3*time.Second, "the closed socket's flow to end", func() bool { return e.udpFlows() == 0 })
		out := d.Output()
		if strings.Contains(out, "[DESTROY]") || strings.Contains(out, "level=DEBUG") {
			t.Errorf("--debug=new,pass printed other kinds:\n%s", out)
		}
	})
}
