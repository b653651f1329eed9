package connect

import (
	"errors"
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rerouted/rerouted/sockdiag"
)

// The program loads (the verifier accepts it), attaches and detaches. The
// end-to-end tests judge what it does to real connections.
func TestLoad(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	root, err := sockdiag.Cgroup2Mount("/proc/self/mountinfo")
	if err != nil || root == "" {
		t.Skipf("no cgroup v2 mount: %v", err)
	}
	// In a network namespace of its own: the program acts on that
	// namespace's sockets only, and the machine's own is left alone.
	done := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with its namespace
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			done <- err
			return
		}
		e, err := Open(root, "")
		if err != nil {
			done <- err
			return
		}
		err = e.Apply(&Image{Rules: []Rule{{Name: "r", Flags: fDport, Dports: nil}}})
		if err == nil {
			_, err = e.Stats()
		}
		done <- errors.Join(err, e.Detach())
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}
