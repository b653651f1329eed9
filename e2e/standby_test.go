package e2e

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
)

// standbyConfig: ISP A is a managed uplink with probes; ISP B is a standby
// uplink with probes. The web rule lists ISP B first; the host marks port
// 8081 for ISP B.
const standbyConfig = `standby = true
[uplink.health]
targets = ["192.0.2.80"]
interval = "200ms"
timeout = "150ms"
down_after = 3
up_after = 2

[[uplink]]
name = "isp-a"
mark = 200
interface = "ha"
gateway = "198.51.100.1"
table = 200
[uplink.health]
targets = ["192.0.2.80"]
interval = "200ms"
timeout = "150ms"
down_after = 3
up_after = 2

[[rule]]
name = "web"
uplink = ["isp-b", "isp-a"]
dport = [80]
`

// standbyProbes counts, on ISP B, the probes among the packets that come
// to it from the host, and the others, recording those by tuple. One
// table, listed at once: the probe counter and ISP B's own "forwarded",
// read by two commands, were once a probe apart (one sent every 200 ms
// passed between the two reads of the baseline).
const standbyProbes = `table inet probes {
	counter echo {}
	counter other {}
	set others {
		typeof ip saddr . ip daddr . meta l4proto . th sport . th dport
		flags dynamic
	}
	chain forward {
		type filter hook forward priority -300; policy accept;
		iifname "cust" icmp type echo-request counter name "echo" accept
		iifname "cust" counter name "other"
		iifname "cust" meta l4proto { tcp, udp } add @others { ip saddr . ip daddr . meta l4proto . th sport . th dport }
	}
}
`

// A standby uplink carries nothing but its probes while the primary is
// up: a minute of traffic by the rule that lists it first, by the host's
// mark for it and by the host's routing leaves ISP B's side with probe
// packets only. With ISP A dark, new connections go out ISP B within the
// failover time; when it answers again, new connections return to ISP A,
// and the connection left on ISP B is closed (reset_tcp) so that it
// reconnects over ISP A.
func TestStandbyUplink(t *testing.T) {
	e := newEnv(t, "kernel", "")
	e.writeRaw(e.headWith("connect", "") + standbyConfig)
	e.hostMark("iptables", 8081)
	if _, err := e.w.Serve(8081); err != nil {
		t.Fatal(err)
	}
	// ISP B counts the probes among what comes to it from the host, and
	// the rest (standbyProbes).
	if err := e.w.B.Nft(standbyProbes); err != nil {
		t.Fatal(err)
	}
	// probes reads the two counters at once: the probes, and the rest.
	probes := func() (echo, other uint64) {
		out, err := e.w.B.Run("nft", "list", "table", "inet", "probes")
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			name string
			n    *uint64
		}{{"counter echo", &echo}, {"counter other", &other}} {
			i := strings.Index(out, c.name)
			j := strings.Index(out[max(i, 0):], "packets ")
			if i < 0 || j < 0 {
				t.Fatalf("no %s in:\n%s", c.name, out)
			}
			fmt.Sscan(out[i+j+len("packets "):], c.n)
		}
		return echo, other
	}
	e.start()
	eventually(t, 3*time.Second, "isp-a up and isp-b held in standby", func() bool {
		u := e.uplinks()
		return u["isp-a/ipv4"].Up && u["isp-b/ipv4"].Standby && !u["isp-b/ipv4"].Up
	})
	if u := e.uplinks()["isp-b/ipv4"]; !strings.Contains(u.Why, "standby while isp-a is up") || !u.Probed {
		t.Errorf("isp-b: %+v, want held in standby while isp-a is up, and probed", u.Status)
	}

	echoB, otherB := probes()
	connections := 0
	for end := time.Now().Add(60 * time.Second); time.Now().Before(end); {
		for _, port := range []uint16{80, 8081, 8080} {
			peer, err := e.w.Fetch(port, 3*time.Second)
			if err != nil || peer.Addr() != networld.HostA {
				t.Fatalf("port %d with isp-b in standby: server saw %v, err %v; want %v", port, peer, err, networld.HostA)
			}
			connections++
		}
		time.Sleep(50 * time.Millisecond)
	}
	echo, other := probes()
	echo, other = echo-echoB, other-otherB
	t.Logf("in 60 s, %d connections; ISP B saw %d probes and %d other packets from the host", connections, echo, other)
	if other != 0 || echo < 100 {
		others, _ := e.w.B.Run("nft", "list", "set", "inet", "probes", "others")
		t.Errorf("ISP B saw %d probes and %d other packets from the host in standby: want probes only (about 300); the others (IPv4 TCP and UDP):\n%s", echo, other, others)
	}

	// ISP A goes dark: ISP B takes new flows within the failover time
	// (3 rounds of 200 ms, and a second).
	if err := e.w.A.Nft("table inet dark {\n\tchain forward {\n\t\ttype filter hook forward priority -200; policy drop;\n\t}\n}\n"); err != nil {
		t.Fatal(err)
	}
	dark := time.Now()
	eventually(t, 3*200*time.Millisecond+time.Second, "isp-b released", func() bool { return e.uplinks()["isp-b/ipv4"].Up })
	t.Logf("isp-b took over %v after ISP A went dark", time.Since(dark).Round(time.Millisecond))
	if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostB {
		t.Fatalf("during ISP A's outage: server saw %v, err %v; want %v", peer, err, networld.HostB)
	}
	held, err := e.w.Dial(networld.DialOptions{Port: 80, Timeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	if peer, err := networld.Greeting(bufio.NewReader(held)); err != nil || peer.Addr() != networld.HostB {
		t.Fatalf("a connection during the outage: server saw %v, err %v", peer, err)
	}

	// ISP A answers again: new flows return to it, and the connection on
	// the standby is closed.
	if _, err := e.w.A.Run("nft", "delete", "table", "inet", "dark"); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*200*time.Millisecond+time.Second, "isp-b held again", func() bool { return e.uplinks()["isp-b/ipv4"].Standby })
	if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostA {
		t.Errorf("after ISP A's return: server saw %v, err %v; want %v", peer, err, networld.HostA)
	}
	held.SetReadDeadline(time.Now().Add(3 * time.Second))
	_, err = held.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
		t.Errorf("the connection left on the standby uplink was not closed: read %v", err)
	}
	for _, want := range []string{"[UPLINK] isp-b ipv4 up", "[UPLINK] isp-b ipv4 down: standby while isp-a is up", `msg="standby uplink is held: new flows take the primary again" uplink=isp-b family=ipv4`} {
		if _, err := e.d.WaitFor(want, time.Second); err != nil {
			t.Error(err)
		}
	}
}

// quotaConfig: ISP B has a 5 MB daily quota; the uploads to 8080 go
// through it while it is up, else by the host's routing.
const quotaConfig = `quota = "5MB"
quota_period = "day"
on_quota = %q

[[rule]]
name = "uploads"
uplink = ["isp-b", "default"]
dport = [8080]

[usage]
state = %q
interval = "1s"
`

// An upload that is running exhausts ISP B's 5 MB quota: a WARNING at 90%
// and at the quota, an [UPLINK] line, the metric at 0, `rerouted uplinks`
// saying so; the next connection goes out ISP A. With on_quota = "keep"
// the upload carries on through ISP B to its end; with "reset" it is
// closed at once.
func TestUplinkQuota(t *testing.T) {
	for _, onQuota := range []string{"keep", "reset"} {
		t.Run(onQuota, func(t *testing.T) {
			e := newEnv(t, "kernel", "")
			e.writeRaw(e.headWith("connect", "metrics_listen = \"127.0.0.1:9477\"\n") + fmt.Sprintf(quotaConfig, onQuota, filepath.Join(e.dir, "usage.json")))
			e.start()
			if u := e.uplinks()["isp-b/ipv4"]; u.Quota != 5e6 || !u.Up {
				t.Fatalf("isp-b at the start: %+v", u.Status)
			}
			c, err := e.w.Dial(networld.DialOptions{Port: 8080, Timeout: 3 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			r := bufio.NewReader(c)
			if peer, err := networld.Greeting(r); err != nil || peer.Addr() != networld.HostB {
				t.Fatalf("the upload: server saw %v, err %v", peer, err)
			}
			// 40 KB each 100 ms: the 8 MB upload runs 20 s; each
			// harvest (1 s) sees 0.4 MB more, so one falls between 90%
			// and the quota.
			const total = 8 << 20
			chunk := make([]byte, 40<<10)
			sent, over := 0, time.Time{}
			var werr error
			for sent < total {
				c.SetWriteDeadline(time.Now().Add(3 * time.Second))
				n, err := c.Write(chunk)
				sent += n
				if err != nil {
					werr = err
					break
				}
				if over.IsZero() {
					if _, err := e.d.WaitFor("uplink is over its quota", 0); err == nil {
						over = time.Now()
					}
				}
				time.Sleep(100 * time.Millisecond)
			}
			if over.IsZero() { // the reset may come before the line is read
				if _, err := e.d.WaitFor("uplink is over its quota", 2*time.Second); err != nil {
					t.Fatalf("the quota was never reached (%d bytes sent; write: %v):\n%s", sent, werr, e.d.Output())
				}
				over = time.Now()
			}
			if peer, err := e.w.Fetch(8080, 3*time.Second); err != nil || peer.Addr() != networld.HostA {
				t.Errorf("the connection after the quota: server saw %v, err %v; want %v", peer, err, networld.HostA)
			}
			switch onQuota {
			case "keep":
				if werr != nil {
					t.Fatalf("the upload failed after %d bytes: %v", sent, werr)
				}
				c.CloseWrite()
				if line, err := r.ReadString('\n'); err != nil || !strings.HasPrefix(line, fmt.Sprint(sent)+" ") {
					t.Errorf("on_quota = \"keep\": the server received %q (%v), want all %d bytes", line, err, sent)
				}
			case "reset":
				if werr == nil {
					t.Fatalf("on_quota = \"reset\": the upload ran to its end")
				}
				if d := time.Since(over); d > 3*time.Second {
					t.Errorf("on_quota = \"reset\": the upload ended %v after the quota, want at once", d)
				}
				t.Logf("the upload ended after %d bytes: %v", sent, werr)
			}
			u := e.uplinks()["isp-b/ipv4"]
			if u.Up || u.QuotaUsed < u.Quota || !strings.Contains(u.Why, "over its quota") {
				t.Errorf("isp-b after the quota: %+v", u.Status)
			}
			if v := e.metric(`rerouted_uplink_quota_remaining_bytes{uplink="isp-b"}`); v != 0 {
				t.Errorf("rerouted_uplink_quota_remaining_bytes: %v, want 0", v)
			}
			for _, want := range []string{`msg="uplink has used 90% of its quota" uplink=isp-b`, "[UPLINK] isp-b ipv4 down: over its quota"} {
				if _, err := e.d.WaitFor(want, time.Second); err != nil {
					t.Error(err)
				}
			}
		})
	}
}
