package e2e

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/connect"
	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy"
	"golang.org/x/sys/unix"
)

// checkSteering holds a daemon whose configuration asks for connect-time
// steering (the default) to it: it steers, or it fell back to the queue
// for a reason this host has (Linux < 5.14, or no cgroup v2 mounted),
// which its warning names. Any other fallback (a program the verifier
// refuses, an attach that fails) fails the test, whatever the test then
// checks: the queue engine would pass it. It logs "rerouted
// steering=connect" or "rerouted steering=queue", which make test-kernels
// reports per kernel.
func checkSteering(t *testing.T, d *networld.Daemon, cfgPath string) {
	t.Helper()
	if !steersAtConnect(cfgPath) {
		return
	}
	if line, err := d.WaitFor("connect-time steering failed", 0); err == nil {
		t.Fatalf("connect-time steering failed where it must work: %s", line)
	}
	if _, err := d.WaitFor("connect-time steering: rules the kernel can decide", 0); err == nil {
		t.Log("rerouted steering=connect")
		return
	}
	line, err := d.WaitFor("connect-time steering is not available", 0)
	if err != nil {
		t.Fatalf("neither connect-time steering nor its fallback was announced:\n%s", d.Output())
	}
	want, err := expectedFallback()
	if err != nil {
		t.Fatal(err)
	}
	if want == "" {
		t.Fatalf("connect-time steering fell back to the queue on a host that has Linux ≥ 5.14 and cgroup v2: %s", line)
	}
	if !strings.Contains(line, `reason="`+want+`"`) {
		t.Fatalf("connect-time steering fell back, but not for what this host lacks (%s): %s", want, line)
	}
	t.Logf("rerouted steering=queue (%s)", want)
}

// steersAtConnect says whether a configuration asks for connect-time
// steering (steering = "connect", the default).
func steersAtConnect(cfgPath string) bool {
	cfg, err := policy.Load(cfgPath)
	return err == nil && cfg.Daemon.Steering == "connect"
}

// expectedFallback is what this host lacks for connect-time steering, as
// the connect package names it, or "" when it lacks nothing.
func expectedFallback() (string, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return "", err
	}
	release := unix.ByteSliceToString(u.Release[:])
	major, minor, err := kernelVersion(release)
	if err != nil {
		return "", err
	}
	if major < 5 || major == 5 && minor < 14 {
		return connect.ReasonKernel, nil
	}
	if _, err := owner.Cgroup2Mount("/proc/self/mountinfo"); err != nil {
		if nm := (*owner.NoMountError)(nil); errors.As(err, &nm) {
			return connect.ReasonNoCgroup2, nil
		}
		return "", err
	}
	return "", nil
}

// kernelVersion reads "6.1.0-50-amd64" as 6, 1.
func kernelVersion(release string) (major, minor int, err error) {
	f := strings.FieldsFunc(release, func(r rune) bool { return r == '.' || r == '-' || r == '+' })
	if len(f) >= 2 {
		if major, err = strconv.Atoi(f[0]); err == nil {
			if minor, err = strconv.Atoi(f[1]); err == nil {
				return major, minor, nil
			}
		}
	}
	return 0, 0, fmt.Errorf("kernel release %q: no major.minor", release)
}

// kernelDecisionsExpected says whether this kernel lets the kernel decide
// host marks itself: every kernel from 5.10 on (the matrix runs 5.10, 6.1
// and 6.12). Elsewhere the daemon decides host marks at the queue, and
// says so.
func kernelDecisionsExpected(t *testing.T) bool {
	t.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	major, minor, err := kernelVersion(unix.ByteSliceToString(u.Release[:]))
	if err != nil {
		t.Fatal(err)
	}
	return major > 5 || major == 5 && minor >= 10
}
