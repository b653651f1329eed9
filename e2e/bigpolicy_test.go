package e2e

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
)

// Every policy check accepts runs: 10,000 rules (the one that matches
// last), and a rule with a list of 500,000 destinations; both translate.
// The kernel refuses a transaction past its socket's buffer: the
// prefilter's sets go in in several, the rules in one.
func TestLargePolicies(t *testing.T) {
	policyCase := func(name string, rules func() string) {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, "kernel", "")
			e.writeConfig(rules())
			if out, err := e.w.Host.Run(bin, "check", "--config", e.cfg); err != nil {
				t.Fatalf("check: %v: %s", err, out)
			}
			start := time.Now()
			// Its own budget: loading 500,000 destinations or 10,000 rules
			// is most of the start (1-2 s natively, ~12 s race-built).
			e.readyBudget = 30 * time.Second
			e.start()
			t.Logf("ready in %v", time.Since(start).Round(time.Millisecond))
			peer, err := e.w.Fetch(80, 5*time.Second)
			if err != nil || peer.Addr() != networld.HostB {
				t.Fatalf("port 80: server saw %v (%v), want ISP B's address", peer, err)
			}
			if peer, err := e.w.Fetch(8080, 5*time.Second); err != nil || peer.Addr() != networld.HostA {
				t.Fatalf("port 8080 (no rule): server saw %v (%v), want ISP A's address", peer, err)
			}
		})
	}
	policyCase("10000-rules", func() string {
		var b strings.Builder
		for i := 0; i < 9999; i++ {
			// Each rule its own port and user: sets of their own.
			fmt.Fprintf(&b, "[[rule]]\nname = \"r%d\"\nuplink = \"isp-b\"\ndport = [%d]\nuid = %d\n\n", i, 10000+i, 20000+i)
		}
		b.WriteString("[[rule]]\nname = \"last\"\nuplink = \"isp-b\"\ndport = [80]\n")
		return b.String()
	})
	policyCase("500000-destinations", func() string {
		var b strings.Builder
		b.WriteString("[[rule]]\nname = \"big\"\nuplink = \"isp-b\"\ndport = [80]\ndst = [")
		// 500,000 /32s in 10.0.0.0/8's documentation-free space would be
		// routable; these are 2001:db8::/32 addresses and the server.
		for i := 0; i < 499999; i++ {
			fmt.Fprintf(&b, "\"2001:db8:%x:%x::/64\", ", i>>16, i&0xffff)
		}
		fmt.Fprintf(&b, "%q]\n", networld.ServerAddr.String()+"/32")
		return b.String()
	})
}
