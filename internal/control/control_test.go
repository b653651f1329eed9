package control

import (
	"net"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// A user the control socket keeps out is told that root is needed, not
// asked whether the daemon runs; a missing socket still asks that.
func TestDialError(t *testing.T) {
	denied := &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", unix.EACCES)}
	msg := dialError("/run/rerouted/rerouted.sock", denied).Error()
	if !strings.Contains(msg, "the control socket answers root only (run it as root") || strings.Contains(msg, "is rerouted running") {
		t.Errorf("permission denied: %q", msg)
	}
	missing := &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", unix.ENOENT)}
	if msg := dialError("/run/rerouted/rerouted.sock", missing).Error(); !strings.Contains(msg, "is rerouted running?") || strings.Contains(msg, "root") {
		t.Errorf("no socket: %q", msg)
	}
}
