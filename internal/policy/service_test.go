package policy

import (
	"net/netip"
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// A local service's datagram is decided by rules naming the socket's owner
// only: a rule about destinations alone never moves a service's answers.
func TestDecideService(t *testing.T) {
	cfg, err := Parse("t.toml", []byte(`
[[uplink]]
name = "isp-b"
mark = 100

[[rule]]
name = "by destination"
uplink = "isp-b"
dst = ["192.0.2.0/24"]

[[rule]]
name = "by user"
uplink = "isp-b"
uid = 53
dst = ["192.0.2.0/24"]
`))
	if err != nil {
		t.Fatal(err)
	}
	f := &Flow{Proto: ipproto.UDP, Dst: netip.MustParseAddrPort("192.0.2.80:4000"), UID: 0, HasUID: true}
	if r := cfg.Decide(f); r == nil || r.Name != "by destination" {
		t.Fatalf("Decide: %v", r)
	}
	if r := cfg.DecideService(f); r != nil {
		t.Errorf("DecideService applied %q to another user's service", r.Name)
	}
	f.UID = 53
	if r := cfg.DecideService(f); r == nil || r.Name != "by user" {
		t.Errorf("DecideService: %v, want the rule naming the owner", r)
	}
}
