package e2e

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
)

// Restart without loss (kernel datapath): a daemon stopped for a restart
// (SIGUSR2, exit 75) or killed leaves its table; flows keep working while
// none runs; the next daemon adopts them, lists them, and removes them when
// their sockets go. New connections are translated again at once.
func TestRestartAdoptsFlows(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	if _, err := e.w.ServeUDP(53); err != nil {
		t.Fatal(err)
	}
	e.hostMarkDatagrams(53)
	d := e.start()

	c, err := e.w.Dial(networld.DialOptions{Port: 80})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	r := bufio.NewReader(c)
	peer, err := networld.Greeting(r)
	if err != nil || peer.Addr() != networld.HostB {
		t.Fatalf("server saw %v, err %v", peer, err)
	}
	local := c.LocalAddr().(*net.TCPAddr).AddrPort()
	sent := sha256.New()
	chunk := bytes.Repeat([]byte("rerouted restart "), 1<<16) // 1 MiB
	send := func() {
		t.Helper()
		sent.Write(chunk)
		if _, err := c.Write(chunk); err != nil {
			t.Fatalf("send: %v", err)
		}
	}
	send()
	dns := netip.AddrPortFrom(networld.ServerAddr, 53)
	u, err := e.w.UDPSocket(dns, false, netip.AddrPort{})
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	ask := func(when string) {
		t.Helper()
		if p, err := networld.AskUDP(u, dns, "q", 2*time.Second); err != nil || p.Addr() != networld.HostB {
			t.Fatalf("%s: udp server saw %v, err %v", when, p, err)
		}
	}
	ask("before the restart")

	for round, stop := range []string{"SIGUSR2", "SIGKILL"} {
		// In the second round a translated connection dies while no
		// daemon runs: the next one must remove its elements.
		var doomed *net.TCPConn
		if round == 1 {
			if doomed, err = e.w.Dial(networld.DialOptions{Port: 80}); err != nil {
				t.Fatal(err)
			}
		}
		if stop == "SIGUSR2" {
			d.Signal(syscall.SIGUSR2)
			var ee *exec.ExitError
			if err := d.Wait(10 * time.Second); !errors.As(err, &ee) || ee.ExitCode() != 75 {
				t.Fatalf("after SIGUSR2: %v, want exit status 75\n%s", err, d.Output())
			}
		} else {
			d.Kill()
		}
		if !strings.Contains(tables(t, e.w.Host), "inet rerouted") {
			t.Fatalf("%s: the table is gone", stop)
		}
		if doomed != nil {
			doomed.SetLinger(0) // closes with a RST: no TIME_WAIT keeps the socket
			doomed.Close()
		}
		// No daemon: the kernel still translates both flows.
		send()
		ask("with no daemon after " + stop)

		d = e.start()
		// Round 1 also adopts round 0's new connection, in TIME_WAIT, and
		// removes the one that died.
		line, err := d.WaitFor("adopted the flows an earlier run left", 5*time.Second)
		if err != nil || !strings.Contains(line, fmt.Sprintf("flows=%d removed=%d", 2+round, round)) {
			t.Fatalf("round %d: %q, %v", round, line, err)
		}
		if n := e.elements("tcp_out4"); n != 1+round {
			t.Errorf("round %d: %d TCP elements after adoption, want %d", round, n, 1+round)
		}
		if _, err := d.WaitFor(fmt.Sprintf("[ADOPT] tcp src=198.51.100.2 dst=192.0.2.80 sport=%d dport=80 mark=100 => src=203.0.113.2 sport=%d dev=hb", local.Port(), peer.Port()), time.Second); err != nil {
			t.Error(err)
		}
		found := false
		for _, f := range e.flows() {
			if f.Proto == "tcp" && f.Original.Sport == local.Port() && f.Reply.Dst == networld.HostB && f.Rule == "adopted" {
				found = true
			}
		}
		if !found {
			t.Fatalf("round %d: the adopted connection is not listed: %+v", round, e.flows())
		}
		send()
		ask("after the restart")
		// A new connection is decided by the new daemon.
		if p, err := e.w.Fetch(80, 3*time.Second); err != nil || p.Addr() != networld.HostB {
			t.Fatalf("new connection after %s: %v, %v", stop, p, err)
		}
	}

	// The conversation ends whole: every byte sent across both restarts.
	if err := c.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	reply, err := r.ReadString('\n')
	if want := fmt.Sprintf("%d %x", 5*len(chunk), sent.Sum(nil)); err != nil || strings.TrimSpace(reply) != want {
		t.Fatalf("server replied %q (err %v), want %q", reply, err, want)
	}
	c.Close()
	wait := 5 * time.Second
	if !e.endTimeWait("192.0.2.80") {
		wait = 70 * time.Second
	}
	eventually(t, wait, "the adopted flows to go with their sockets", func() bool {
		for _, f := range e.flows() {
			if f.Proto == "tcp" {
				return false
			}
		}
		return e.elements("tcp_out4") == 0
	})
}
