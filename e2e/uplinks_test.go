package e2e

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
)

const managedUplink = `
[[uplink]]
name = "isp-b"
mark = 100
interface = "hb"
gateway = "203.0.113.1"
gateway6 = "2001:db8:b::1"
table = 100
`

// Managed uplinks: with gateway and table set, rerouted installs ISP B's
// default route in its table, the fwmark rule, and "from <ISP B address>"
// rules, IPv4 and IPv6; connections that arrive on ISP B are answered
// through it; on exit exactly that is removed (an operator's rule stays),
// and after a crash the next run adopts what the last one left.
func TestManagedUplinks(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	// The world's own routing for ISP B goes: rerouted is to make it.
	for _, cmd := range [][]string{
		{"rule", "del", "fwmark", "100", "table", "100"}, {"rule", "del", "from", "203.0.113.2", "table", "100"},
		{"route", "flush", "table", "100"},
		{"-6", "rule", "del", "fwmark", "100", "table", "100"}, {"-6", "rule", "del", "from", "2001:db8:b::2", "table", "100"},
		{"-6", "route", "flush", "table", "100"},
		{"rule", "add", "from", "192.0.2.99", "lookup", "200", "pref", "500"}, // the operator's, unrelated
	} {
		if _, err := e.w.Host.Run("ip", cmd...); err != nil {
			t.Fatal(err)
		}
	}
	// The uplink section replaces the harness's unmanaged one.
	head := strings.Replace(fmt.Sprintf(configHead, e.sock, e.dp), "[[uplink]]\nname = \"isp-b\"\nmark = 100\ninterface = \"hb\"\n", managedUplink, 1)
	if err := writeFile(e.cfg, head+webRule); err != nil {
		t.Fatal(err)
	}

	// A server on the host, on ISP B's address, and a client on the internet.
	ln, err := listenOnHost(e, "203.0.113.2:7000")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	inbound := func() error {
		var c net.Conn
		err := e.w.Net.Do(func() (err error) {
			c, err = net.DialTimeout("tcp", "203.0.113.2:7000", 1500*time.Millisecond)
			return err
		})
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		_, err = bufio.NewReader(c).ReadString('\n')
		return err
	}
	if err := inbound(); err == nil {
		t.Fatal("a connection to ISP B's address was answered with no from-rule: the world does not show the pitfall")
	}

	rules := func(family string) string {
		out, err := e.w.Host.Run("ip", family, "rule", "show")
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	check := func(want bool) {
		t.Helper()
		for _, c := range []struct{ family, rule string }{
			{"-4", "1000:\tfrom all fwmark 0x64 lookup 100 proto 114"},
			{"-4", "1001:\tfrom 203.0.113.2 lookup 100 proto 114"},
			{"-6", "1000:\tfrom all fwmark 0x64 lookup 100 proto 114"},
			{"-6", "1001:\tfrom 2001:db8:b::2 lookup 100 proto 114"},
		} {
			if got := strings.Contains(rules(c.family), c.rule); got != want {
				t.Errorf("ip %s rule has %q: %v, want %v:\n%s", c.family, c.rule, got, want, rules(c.family))
			}
		}
		for _, c := range []struct{ family, route string }{
			{"-4", "default via 203.0.113.1 dev hb proto 114"}, {"-6", "default via 2001:db8:b::1 dev hb proto 114"},
		} {
			out, _ := e.w.Host.Run("ip", c.family, "route", "show", "table", "100")
			if got := strings.Contains(out, c.route); got != want {
				t.Errorf("ip %s route show table 100 has %q: %v, want %v:\n%s", c.family, c.route, got, want, out)
			}
		}
		if !strings.Contains(rules("-4"), "500:\tfrom 192.0.2.99 lookup 200") {
			t.Errorf("the operator's rule is gone:\n%s", rules("-4"))
		}
	}

	d := e.start()
	check(true)
	for _, dst := range []struct{ o networld.DialOptions }{{networld.DialOptions{Port: 80}}, {networld.DialOptions{Dst: networld.Server6, Port: 80}}} {
		peer, err := e.w.FetchFrom(dst.o)
		if err != nil || (peer.Addr() != networld.HostB && peer.Addr() != networld.HostB6) {
			t.Fatalf("to %v: server saw %v, err %v; want ISP B's address", dst.o.Dst, peer, err)
		}
	}
	if err := inbound(); err != nil {
		t.Errorf("a connection to ISP B's address was not answered through ISP B: %v", err)
	}

	// A crash leaves the routing (existing flows keep working); the next
	// run adopts it and removes it on exit.
	d.Kill()
	check(true)
	d = e.start()
	if _, err := d.WaitFor("uplink rule added", 0); err == nil {
		t.Error("the run after the crash added rules again instead of adopting them")
	}
	// Crash again, and move the uplink to table 101: the next run removes
	// what the last one installed for table 100.
	d.Kill()
	if err := writeFile(e.cfg, strings.Replace(head, "table = 100", "table = 101", 1)+webRule); err != nil {
		t.Fatal(err)
	}
	d = e.start()
	check(false)
	if !strings.Contains(rules("-4"), "1000:\tfrom all fwmark 0x64 lookup 101 proto 114") {
		t.Errorf("no fwmark rule for table 101:\n%s", rules("-4"))
	}
	d.Signal(syscall.SIGTERM)
	if err := d.Wait(10 * time.Second); err != nil {
		t.Fatalf("%v\n%s", err, d.Output())
	}
	for _, family := range []string{"-4", "-6"} {
		if out := rules(family); strings.Contains(out, "proto 114") {
			t.Errorf("ip %s rules of rerouted's left after exit:\n%s", family, out)
		}
		if out, _ := e.w.Host.Run("ip", family, "route", "show", "table", "all"); strings.Contains(out, "proto 114") {
			t.Errorf("ip %s routes of rerouted's left after exit:\n%s", family, out)
		}
	}
	check(false)
}

func writeFile(path, s string) error { return os.WriteFile(path, []byte(s), 0o600) }

// listenOnHost listens on addr in the host namespace and greets every
// connection with a line.
func listenOnHost(e *env, addr string) (net.Listener, error) {
	var ln net.Listener
	err := e.w.Host.Do(func() (err error) {
		ln, err = net.Listen("tcp", addr)
		return err
	})
	if err != nil {
		return nil, err
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintln(c, "hello from the host")
			c.Close()
		}
	}()
	return ln, nil
}

// Managed routing that the world takes away comes back: a rule an
// operator's tool deletes, and the default route the kernel drops when
// ISP B's link goes down (it comes back when the link does). Meanwhile
// and afterwards rule-matched connections are counted on the wire: none
// leaves through ISP A once the routing is back.
func TestManagedRoutingRepaired(t *testing.T) {
	e := newEnv(t, "kernel", "")
	for _, cmd := range [][]string{
		{"rule", "del", "fwmark", "100", "table", "100"}, {"rule", "del", "from", "203.0.113.2", "table", "100"},
		{"route", "flush", "table", "100"},
		{"-6", "rule", "del", "fwmark", "100", "table", "100"}, {"-6", "rule", "del", "from", "2001:db8:b::2", "table", "100"},
		{"-6", "route", "flush", "table", "100"},
	} {
		if _, err := e.w.Host.Run("ip", cmd...); err != nil {
			t.Fatal(err)
		}
	}
	head := strings.Replace(fmt.Sprintf(configHead, e.sock, e.dp), "[[uplink]]\nname = \"isp-b\"\nmark = 100\ninterface = \"hb\"\n", managedUplink, 1)
	head = strings.Replace(head, "[daemon]\n", "[daemon]\nmetrics_listen = \"127.0.0.1:9477\"\n", 1)
	if err := writeFile(e.cfg, head+webRule); err != nil {
		t.Fatal(err)
	}
	e.start()
	viaB := func(what string) {
		t.Helper()
		if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostB {
			t.Fatalf("%s: server saw %v, err %v", what, peer, err)
		}
	}
	viaB("at start")
	has := func(args ...string) bool {
		out, err := e.w.Host.Run("ip", args...)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Contains(out, "lookup 100") || strings.Contains(out, "default via")
	}

	// 1. Someone deletes the fwmark rule.
	if _, err := e.w.Host.Run("ip", "rule", "del", "fwmark", "100", "table", "100", "pref", "1000"); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Second, "the fwmark rule back", func() bool { return has("rule", "show", "fwmark", "100") })
	if _, err := e.d.WaitFor(`managed uplink routing was removed; put it back" what="rule from all fwmark 0x64 lookup 100 pref 1000"`, time.Second); err != nil {
		t.Error(err)
	}
	viaB("after the rule came back")

	// 2. ISP B's link goes down and comes back: the kernel removes the
	// table's default route, which rerouted can only put back once the
	// link is up again.
	synA := e.counter(e.w.A, "syn")
	if _, err := e.w.Host.Run("ip", "link", "set", "hb", "down"); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Second, "the kernel to drop table 100's default route", func() bool { return !has("route", "show", "table", "100") })
	if _, err := e.d.WaitFor("managed uplink routing is missing and cannot be put back yet", 2*time.Second); err != nil {
		t.Error(err)
	}
	if _, err := e.w.Host.Run("ip", "link", "set", "hb", "up"); err != nil {
		t.Fatal(err)
	}
	up := time.Now()
	eventually(t, time.Second, "table 100's default route back", func() bool { return has("route", "show", "table", "100") })
	t.Logf("default route back %v after the link came up", time.Since(up).Round(time.Millisecond))
	eventually(t, time.Second, "isp-b up again", func() bool { return e.uplinks()["isp-b/ipv4"].Up })
	for i := 0; i < 20; i++ {
		viaB(fmt.Sprintf("connection %d after the link came back", i))
	}
	if n := e.counter(e.w.A, "syn") - synA; n != 0 {
		t.Errorf("%d SYNs left through ISP A", n)
	}
	for _, what := range []string{"ip_rule", "route"} {
		if n := e.metric(fmt.Sprintf(`rerouted_repairs_total{what=%q}`, what)); n < 1 {
			t.Errorf("rerouted_repairs_total{what=%q} = %v", what, n)
		}
	}
}

// A managed uplink on a DHCP-like interface: gateway = "auto" takes the
// gateway from the default route the interface's client installs, and
// follows it when it changes; the "from ADDRESS" rules follow the
// interface's addresses when it is renumbered, so connections to the new
// address are answered through the uplink.
func TestManagedUplinkFollowsItsInterface(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	for _, cmd := range [][]string{
		{"rule", "del", "fwmark", "100", "table", "100"}, {"rule", "del", "from", "203.0.113.2", "table", "100"},
		{"route", "flush", "table", "100"},
		// What a DHCP client installs: a default route on hb, a worse
		// one than the host's main one.
		{"route", "add", "default", "via", "203.0.113.1", "dev", "hb", "metric", "1000"},
	} {
		if _, err := e.w.Host.Run("ip", cmd...); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.w.Host.Sysctl("net.ipv4.conf.hb.promote_secondaries=1"); err != nil {
		t.Fatal(err)
	}
	head := strings.Replace(fmt.Sprintf(configHead, e.sock, e.dp), "[[uplink]]\nname = \"isp-b\"\nmark = 100\ninterface = \"hb\"\n",
		"[[uplink]]\nname = \"isp-b\"\nmark = 100\ninterface = \"hb\"\ngateway = \"auto\"\ntable = 100\n", 1)
	if err := writeFile(e.cfg, head+webRule); err != nil {
		t.Fatal(err)
	}
	e.start()
	show := func(args ...string) string {
		t.Helper()
		out, err := e.w.Host.Run("ip", args...)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	if out := show("route", "show", "table", "100"); !strings.Contains(out, "default via 203.0.113.1 dev hb proto 114") {
		t.Fatalf("table 100:\n%s", out)
	}
	if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != networld.HostB {
		t.Fatalf("server saw %v, err %v", peer, err)
	}

	// Renumbered.
	if _, err := e.w.Host.Run("ip", "addr", "add", "203.0.113.3/24", "dev", "hb"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.w.Host.Run("ip", "addr", "del", "203.0.113.2/24", "dev", "hb"); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Second, "the from rules to follow", func() bool {
		out := show("rule", "show", "table", "100")
		return strings.Contains(out, "from 203.0.113.3 lookup 100") && !strings.Contains(out, "from 203.0.113.2 ")
	})
	ln, err := listenOnHost(e, "203.0.113.3:7000")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var c net.Conn
	if err := e.w.Net.Do(func() (err error) { c, err = net.DialTimeout("tcp", "203.0.113.3:7000", 2*time.Second); return err }); err != nil {
		t.Fatalf("a connection to the new address is not answered through ISP B: %v", err)
	}
	c.Close()
	if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != hostB3 {
		t.Errorf("after renumbering: server saw %v, err %v", peer, err)
	}

	// A new gateway: ISP B's router answers at .254 too, and the client
	// moves its route there.
	if _, err := e.w.B.Run("ip", "addr", "add", "203.0.113.254/24", "dev", "cust"); err != nil {
		t.Fatal(err)
	}
	if _, err := e.w.Host.Run("ip", "route", "replace", "default", "via", "203.0.113.254", "dev", "hb", "metric", "1000"); err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Second, "table 100 to follow the gateway", func() bool {
		return strings.Contains(show("route", "show", "table", "100"), "default via 203.0.113.254 dev hb proto 114")
	})
	if peer, err := e.w.Fetch(80, 3*time.Second); err != nil || peer.Addr() != hostB3 {
		t.Errorf("after the gateway moved: server saw %v, err %v", peer, err)
	}

	// On exit, what it installed goes, whatever it became.
	if err := e.d.Stop(); err != nil {
		t.Fatal(err)
	}
	if out := show("route", "show", "table", "100"); strings.TrimSpace(out) != "" {
		t.Errorf("table 100 after exit:\n%s", out)
	}
	if out := show("rule", "show", "table", "100"); strings.TrimSpace(out) != "" {
		t.Errorf("rules left:\n%s", out)
	}
}
