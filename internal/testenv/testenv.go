// Package testenv is the one rule for tests that need something this
// machine may lack (root, a kernel feature, cgroup v2): without it they
// skip, unless REROUTED_REQUIRE_E2E=1 (set by CI and the kernel matrix's
// guests), in which case they fail, so that CI can never pass untested.
//
// A failure of the code under test is never a reason to skip: a test
// skips only for what it needs from its environment.
package testenv

import (
	"fmt"
	"os"
	"testing"
)

// RequireEnv is the variable that turns such a skip into a failure.
const RequireEnv = "REROUTED_REQUIRE_E2E"

// Required reports whether skipping is forbidden (RequireEnv=1).
func Required() bool { return os.Getenv(RequireEnv) == "1" }

// Skip skips the test with the message, or fails it under RequireEnv.
func Skip(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if Required() {
		t.Fatalf("%s, and %s=1 forbids skipping", msg, RequireEnv)
	}
	t.Skip(msg)
}

// NeedRoot skips the test (fails it under RequireEnv) unless it runs as
// root; why says what root is needed for.
func NeedRoot(t testing.TB, why string) {
	t.Helper()
	if os.Geteuid() != 0 {
		Skip(t, "needs root (%s)", why)
	}
}

// GuestEnv is set (to 1) by the kernel matrix's guests (e2e/qemu), where
// QEMU may emulate the CPU and everything runs several times slower: the
// one place a test may allow more time than on the host.
const GuestEnv = "REROUTED_E2E_GUEST"

// InGuest reports whether the tests run in a kernel matrix guest.
func InGuest() bool { return os.Getenv(GuestEnv) == "1" }
