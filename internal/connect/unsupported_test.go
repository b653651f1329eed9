package connect

import (
	"errors"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Only what a host is expected to lack is ErrUnsupported, and the error
// names it: a kernel without SO_NETNS_COOKIE. A verifier's refusal, a load
// or attach that fails, or any other error from the cookie is a fault, so
// that the daemon logs it as an error and the tests fail on it.
func TestUnsupportedIsOnlyWhatTheHostLacks(t *testing.T) {
	verifier := &ebpf.VerifierError{}
	for _, c := range []struct {
		name        string
		err         error
		unsupported bool
		reason      string
	}{
		{"no SO_NETNS_COOKIE", cookieError(unix.ENOPROTOOPT), true, ReasonKernel},
		{"cookie: other errno", cookieError(unix.EPERM), false, ""},
		{"cookie: no error", cookieError(nil), false, ""},
		{"verifier", loadError(verifier), false, ""},
		{"load", loadError(errors.New("map create: operation not permitted")), false, ""},
		{"wrapped unsupported", errorsJoinLike(&UnsupportedError{Reason: ReasonNoCgroup2, Err: errors.New("no cgroup2 mount")}), true, ReasonNoCgroup2},
	} {
		t.Run(c.name, func(t *testing.T) {
			if got := errors.Is(c.err, ErrUnsupported); got != c.unsupported {
				t.Fatalf("errors.Is(%v, ErrUnsupported) = %v, want %v", c.err, got, c.unsupported)
			}
			var ue *UnsupportedError
			if errors.As(c.err, &ue) != c.unsupported {
				t.Fatalf("errors.As(%v, *UnsupportedError) disagrees with errors.Is", c.err)
			}
			if c.unsupported && (ue.Reason != c.reason || !strings.Contains(c.err.Error(), c.reason)) {
				t.Errorf("%q: reason %q, want %q named in the message", c.err, ue.Reason, c.reason)
			}
		})
	}
	if !errors.Is(loadError(verifier), verifier) {
		t.Error("loadError drops the verifier's error")
	}
}

func errorsJoinLike(err error) error { return errors.Join(errors.New("steer"), err) }
