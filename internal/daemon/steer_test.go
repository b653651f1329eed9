package daemon

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"

	"github.com/cilium/ebpf"
	"github.com/rerouted/rerouted/internal/connect"
)

// Connect-time steering that does not start leaves every flow to the
// queue either way; what the host is expected to lack is a warning naming
// it, anything else (a verifier's refusal) an error.
func TestSteeringFailedLevels(t *testing.T) {
	for _, c := range []struct {
		err   error
		level string
		want  string
	}{
		{fmt.Errorf("open: %w", &connect.UnsupportedError{Reason: connect.ReasonKernel, Err: errors.New("protocol not available")}),
			"level=WARN", `msg="connect-time steering is not available: every new flow is decided at the queue" reason="` + connect.ReasonKernel + `"`},
		{&connect.UnsupportedError{Reason: connect.ReasonNoCgroup2, Err: errors.New("no cgroup2 mount")},
			"level=WARN", `reason="` + connect.ReasonNoCgroup2 + `"`},
		{fmt.Errorf("the verifier refused the program: %w", &ebpf.VerifierError{}),
			"level=ERROR", `msg="connect-time steering failed: every new flow is decided at the queue"`},
		{errors.New("attach connect4 at /sys/fs/cgroup: operation not permitted"),
			"level=ERROR", `msg="connect-time steering failed`},
	} {
		var b bytes.Buffer
		d := &Daemon{log: slog.New(slog.NewTextHandler(&b, nil))}
		d.steeringFailed(c.err)
		if out := b.String(); !strings.Contains(out, c.level) || !strings.Contains(out, c.want) {
			t.Errorf("%v: logged %q, want %s with %s", c.err, out, c.level, c.want)
		}
	}
}
