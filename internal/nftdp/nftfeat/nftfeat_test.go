package nftfeat

import (
	"errors"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/networld/worldtest"
	"golang.org/x/sys/unix"
)

// Every kernel the tests run on has what the table needs: the probe finds
// nothing missing, one enqueue form, and leaves no table behind.
func TestProbe(t *testing.T) {
	ns := worldtest.NS(t)
	var (
		missing []Feature
		queue   string
	)
	if err := ns.Do(func() (err error) { missing, queue, err = Probe(); return err }); err != nil {
		t.Fatal(err)
	}
	if len(missing) > 0 {
		t.Errorf("the probe finds missing features: %v", missing)
	}
	if queue != QueueNative && queue != QueueXT {
		t.Errorf("queue = %q", queue)
	}
	t.Logf("enqueue form: %s", queue)
	out, err := ns.Run("nft", "list", "tables")
	if err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(out) != "" {
		t.Errorf("the probe left tables behind:\n%s", out)
	}
}

func TestKernelErrorNamesModules(t *testing.T) {
	err := error(&KernelError{Missing: []Feature{Features[0], Features[1]}, Err: unix.ENOENT})
	msg := err.Error()
	for _, want := range []string{"nft queue statement", "nft_queue", "nft_compat", "xt_NFQUEUE", "no such file or directory"} {
		if !strings.Contains(msg, want) {
			t.Errorf("%q lacks %q", msg, want)
		}
	}
	if !errors.Is(err, unix.ENOENT) {
		t.Error("KernelError does not unwrap")
	}
	msg = (&KernelError{Err: unix.ENOENT}).Error()
	for _, want := range []string{"kernel module", "nft_queue", "nft_compat", "rerouted doctor"} {
		if !strings.Contains(msg, want) {
			t.Errorf("%q lacks %q", msg, want)
		}
	}
}
