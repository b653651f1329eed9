// Package worldtest gives tests a networld and the rule for tests that need
// root: without it they skip, unless REROUTED_REQUIRE_E2E=1 (set by CI), in
// which case they fail, so that CI can never pass untested.
package worldtest

import (
	"fmt"
	"os"
	"os/exec"
	"sync/atomic"
	"testing"

	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/testenv"
)

// RequireEnv is the variable that turns a skip for missing privileges into a
// failure (testenv's).
const RequireEnv = testenv.RequireEnv

// Require skips (or, under RequireEnv, fails) a test that cannot run here.
func Require(t testing.TB) {
	t.Helper()
	var missing string
	switch {
	case os.Geteuid() != 0:
		missing = "root (network namespaces, nftables, NFQUEUE)"
	default:
		for _, tool := range []string{"ip", "nft"} {
			if _, err := exec.LookPath(tool); err != nil {
				missing = "the " + tool + " command"
			}
		}
	}
	if missing == "" {
		return
	}
	testenv.Skip(t, "end-to-end test needs %s; run it as root (see README)", missing)
}

var seq atomic.Int64

// Prefix returns a namespace name prefix unique to this process and call.
func Prefix() string {
	return fmt.Sprintf("rrt%d-%d", os.Getpid(), seq.Add(1))
}

// NS creates a bare namespace removed when the test ends.
func NS(t testing.TB) *networld.NS {
	t.Helper()
	Require(t)
	ns, err := networld.NewNS(Prefix())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := ns.Delete(); err != nil {
			t.Error(err)
		}
	})
	return ns
}

// World builds the two-ISP world, removed when the test ends.
func World(t testing.TB) *networld.World {
	t.Helper()
	Require(t)
	w, err := networld.New(Prefix(), t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := w.Close(); err != nil {
			t.Error(err)
		}
	})
	return w
}
