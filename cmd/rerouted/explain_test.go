package main

import (
	"bytes"
	"net/netip"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy"
)

type fakeOwner struct{}

func (fakeOwner) Process() (owner.Process, bool) {
	return owner.Process{PID: 42, Comm: "curl", Exe: "/usr/bin/curl"}, true
}
func (fakeOwner) Cgroup() (string, bool) { return "user.slice", true }

// explain names the process's user and group (root is in every host's
// user database), not just their numbers.
func TestExplainHeaderNamesUser(t *testing.T) {
	cfg, err := policy.Parse("t.toml", []byte("[[uplink]]\nname = \"isp-b\"\nmark = 100\n"))
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	explain(&b, cfg, &policy.Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort("192.0.2.80:80"), HasUID: true, Owner: fakeOwner{}})
	if first, _, _ := strings.Cut(b.String(), "\n"); first != `process 42 "curl" (/usr/bin/curl) uid 0 (root) gid 0 (root) cgroup /user.slice` {
		t.Errorf("first line %q", first)
	}
}
