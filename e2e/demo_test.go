package e2e

import (
	"os/exec"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/networld/worldtest"
)

// The README's first command must keep working: the demo reproduces the
// problem, fixes it, and cleans up after itself.
func TestDemo(t *testing.T) {
	worldtest.Require(t)
	out, err := exec.Command(lab, "demo").CombinedOutput()
	if err != nil {
		t.Fatalf("rerouted-lab demo: %v\n%s", err, out)
	}
	for _, want := range []string{
		"packets with a foreign source: the SYN left through ISP B carrying 198.51.100.2",
		"[NEW] tcp src=198.51.100.2 dst=192.0.2.80",
		"the server saw the client as 203.0.113.2:",
		"ISP B dropped 0 packets this time",
		`rule="alt-http via isp-b"`,
		"[BIND] tcp dst=192.0.2.80 dport=8080 => src=203.0.113.2 uplink=isp-b", // decided at connect(), the default
		"the socket itself is on 203.0.113.2:",
		"the server saw 198.51.100.2:",
		`dport=53 mark=100 => src=203.0.113.2`, // UDP by a protocol = "udp" rule
		"from an unconnected socket: the server saw 203.0.113.2:",
		`rule="ping via isp-b"`, // ping by a protocol = "icmp" rule
		"): answered",
		`msg="removed table"`,
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("demo output lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("demo output:\n%s", out)
	}
	// Other test packages may be creating namespaces right now: look only
	// for the demo's.
	after, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(after), "rrdemo") {
		t.Errorf("demo left namespaces behind:\n%s", after)
	}
}
