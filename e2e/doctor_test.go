package e2e

import (
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/queue"
)

// doctor runs rerouted doctor in the host namespace and returns its output
// and exit code.
func (e *env) doctor() (string, int) {
	e.t.Helper()
	cmd := e.w.Host.Command(bin, "doctor", "--config", e.cfg)
	out, err := cmd.CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		e.t.Fatal(err)
	}
	return string(out), code
}

// doctor on a healthy host exits 0; on a broken one it names each problem
// with its fix and exits 1.
func TestDoctor(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	out, code := e.doctor()
	if code != 0 || !strings.Contains(out, "no problem found") {
		t.Fatalf("healthy host: exit %d:\n%s", code, out)
	}
	for _, want := range []string{"ok       nftables answers", "ok       NFQUEUE 0-", `fwmark 100 leads to ip table 100`,
		`ok       uplink "isp-b": ip rule from 203.0.113.2 lookup 100 answers connections to it through hb`,
		`ok       uplink "isp-b": ip -6 rule from 2001:db8:b::2 lookup 100 answers connections to it through hb`,
		`fwmark 100 leads to ip -6 table 100`, "no MASQUERADE or SNAT", "ok       no iptables-legacy nat table is in use",
		"ok       configuration file " + e.cfg + ": only root can change it",
		"ok       the kernel has every nftables feature rerouted uses", "ok       new flows reach the daemon through the "} {
		if !strings.Contains(out, want) {
			t.Errorf("healthy host: no %q in:\n%s", want, out)
		}
	}

	// A queue another program holds (here: the test, through a socket
	// bound inside the host namespace) cannot be bound.
	var q *queue.Queue
	if err := e.w.Host.Do(func() (err error) { q, err = queue.Open(0, queue.Options{}); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if q != nil { // the test failed before closing it
			q.Close()
		}
	})
	out, code = e.doctor()
	if code != 1 || !strings.Contains(out, "PROBLEM  NFQUEUE 0 cannot be bound") || !strings.Contains(out, "another program holds NFQUEUE 0") {
		t.Errorf("queue held by another program: exit %d:\n%s", code, out)
	}
	err := q.Close()
	q = nil
	if err != nil {
		t.Fatal(err)
	}

	// A MASQUERADE in iptables-legacy, which nftables does not show.
	legacy := func(op string, rule ...string) {
		t.Helper()
		if _, err := e.w.Host.Run("iptables-legacy", append([]string{"-t", "nat", op, "POSTROUTING"}, rule...)...); err != nil {
			t.Fatal(err)
		}
	}
	for _, c := range []struct {
		rule  []string
		where string
	}{{[]string{"-o", "hb", "-j", "MASQUERADE"}, "hb"}, {[]string{"-j", "MASQUERADE"}, "every interface, hb included"}} {
		spec := strings.Join(c.rule, " ")
		legacy("-A", c.rule...)
		out, code = e.doctor()
		for _, want := range []string{
			"PROBLEM  uplink \"isp-b\": iptables-legacy MASQUERADE in nat chain POSTROUTING (" + spec + ") applies to " + c.where + ";",
			"fix: remove it: iptables-legacy -t nat -D POSTROUTING " + spec + " (and from the rules restored at boot)",
			"1 problem(s) found",
		} {
			if code != 1 || !strings.Contains(out, want) {
				t.Errorf("legacy %s: exit %d, want 1 and %q in:\n%s", spec, code, want, out)
			}
		}
		legacy("-D", c.rule...)
	}
	legacy("-A", "-o", "ha", "-j", "MASQUERADE") // ISP A's, not an uplink's
	out, code = e.doctor()
	if code != 0 || !strings.Contains(out, "ok       no iptables-legacy MASQUERADE or SNAT applies to an uplink") {
		t.Errorf("legacy rules removed: exit %d:\n%s", code, out)
	}

	// Break it three ways.
	if err := e.w.Host.Sysctl("net.ipv4.conf.hb.rp_filter=1"); err != nil {
		t.Fatal(err)
	}
	// (What the finding claims: strict filtering kills translated flows.)
	d := e.start()
	if peer, err := e.w.Fetch(80, 1500*time.Millisecond); err == nil {
		t.Errorf("with strict rp_filter on hb a translated connection worked (server saw %v)", peer)
	}
	d.Kill()
	for _, family := range []string{"-4", "-6"} {
		if _, err := e.w.Host.Run("ip", family, "rule", "del", "fwmark", "100", "table", "100"); err != nil {
			t.Fatal(err)
		}
	}
	if err := e.w.Host.Nft("table ip nat {\n\tchain post {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\toifname \"hb\" masquerade\n\t}\n}\n"); err != nil {
		t.Fatal(err)
	}
	out, code = e.doctor()
	if code != 1 {
		t.Errorf("broken host: exit %d, want 1:\n%s", code, out)
	}
	for _, want := range []string{
		"PROBLEM  uplink \"isp-b\": strict reverse-path filtering on hb",
		"fix: sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.hb.rp_filter=2",
		"PROBLEM  uplink \"isp-b\": no ip rule sends fwmark 100 to a routing table",
		"PROBLEM  uplink \"isp-b\": no ip -6 rule sends fwmark 100 to a routing table",
		"fix: ip rule add fwmark 100 lookup",
		"PROBLEM  uplink \"isp-b\": MASQUERADE in table ip nat chain post applies to hb",
		// With no fwmark rule, marked traffic leaves through ISP A: the
		// uplink is down for both families.
		"PROBLEM  uplink \"isp-b\" is down for ipv4: the route with mark 100 leads out ha, not hb",
		"PROBLEM  uplink \"isp-b\" is down for ipv6",
		"6 problem(s) found",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("broken host: no %q in:\n%s", want, out)
		}
	}

	// A rule to an empty table, and no rule for ISP B's address.
	for _, cmd := range [][]string{{"rule", "add", "fwmark", "100", "table", "100"}, {"route", "flush", "table", "100"},
		{"rule", "del", "from", "203.0.113.2", "table", "100"}} {
		if _, err := e.w.Host.Run("ip", cmd...); err != nil {
			t.Fatal(err)
		}
	}
	out, _ = e.doctor()
	for _, want := range []string{
		"PROBLEM  uplink \"isp-b\": fwmark 100 leads to ip table 100, which has no routes",
		"PROBLEM  uplink \"isp-b\": no ip rule answers connections to 203.0.113.2 through hb",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("no %q in:\n%s", want, out)
		}
	}
}

// An uplink without interface = is checked through the interface its
// table's default route leaves by: its reverse-path filter (the larger of
// "all" and the interface's), its address rules, and NAT on it, including
// a MASQUERADE that names no interface.
func TestDoctorFindsUplinkInterface(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	cfg, err := os.ReadFile(e.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := writeFile(e.cfg, strings.Replace(string(cfg), "interface = \"hb\"\n", "", 1)); err != nil {
		t.Fatal(err)
	}
	out, code := e.doctor()
	for _, want := range []string{
		`ok       uplink "isp-b": no interface set; checked as hb, where the default route of ip table 100 leaves`,
		`ok       uplink "isp-b": rp_filter on hb is not strict (all=`,
		`ok       uplink "isp-b": ip rule from 203.0.113.2 lookup 100 answers connections to it through hb`,
	} {
		if code != 0 || !strings.Contains(out, want) {
			t.Errorf("exit %d, want 0 and %q in:\n%s", code, want, out)
		}
	}
	// Strict filtering for all interfaces overrides hb's loose setting.
	if err := e.w.Host.Sysctl("net.ipv4.conf.hb.rp_filter=0", "net.ipv4.conf.all.rp_filter=1"); err != nil {
		t.Fatal(err)
	}
	if err := e.w.Host.Nft("table ip nat {\n\tchain post {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tmasquerade\n\t}\n}\n"); err != nil {
		t.Fatal(err)
	}
	out, code = e.doctor()
	for _, want := range []string{
		`PROBLEM  uplink "isp-b": strict reverse-path filtering on hb (all=1, hb=0)`,
		`PROBLEM  uplink "isp-b": MASQUERADE in table ip nat chain post applies to every interface, hb included; conntrack NAT`,
	} {
		if code != 1 || !strings.Contains(out, want) {
			t.Errorf("exit %d, want 1 and %q in:\n%s", code, want, out)
		}
	}
	if strings.Contains(out, "applies to ;") {
		t.Errorf("a finding names no place:\n%s", out)
	}
}
