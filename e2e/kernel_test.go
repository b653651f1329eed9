package e2e

import (
	"testing"

	"github.com/rerouted/rerouted/internal/networld/worldtest"
	"github.com/rerouted/rerouted/internal/nftdp/nftfeat"
)

// The kernel under test has every nftables feature the table uses (make
// test-kernels runs this on each kernel), and one enqueue form.
func TestKernelHasEveryFeature(t *testing.T) {
	ns := worldtest.NS(t)
	var (
		missing []nftfeat.Feature
		queue   string
	)
	if err := ns.Do(func() (err error) { missing, queue, err = nftfeat.Probe(); return err }); err != nil {
		t.Fatal(err)
	}
	for _, f := range missing {
		t.Errorf("the kernel lacks %s", f)
	}
	if queue == "" {
		t.Error("the kernel has neither enqueue form")
	}
	t.Logf("enqueue form: %s", queue)
	// What the kernel needs to decide host-marked flows itself: every
	// kernel the matrix runs has it (without it the daemon decides them at
	// the queue, and says so).
	var lacks []nftfeat.Feature
	if err := ns.Do(func() (err error) { lacks, err = nftfeat.ProbeKernelDecisions(); return err }); err != nil {
		t.Fatal(err)
	}
	switch {
	case kernelDecisionsExpected(t):
		for _, f := range lacks {
			t.Errorf("the kernel lacks %s: host marks would be decided at the queue", f)
		}
	case len(lacks) == 0:
		t.Error("a kernel before 5.10 has what the kernel's decisions of host marks need: update kernelDecisionsExpected")
	default:
		t.Logf("host marks are decided at the queue here, as expected before Linux 5.10: the kernel lacks %v", lacks)
	}
}
