package route

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld/worldtest"
)

// The watcher counts a routing change and kicks its reader, and stops when
// its context ends, without waiting for another change.
func TestWatchRouting(t *testing.T) {
	ns := worldtest.NS(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var changes atomic.Uint64
	kick := make(chan struct{}, 1)
	var done <-chan struct{}
	if err := ns.Do(func() (err error) { done, err = Watch(ctx, &changes, kick); return err }); err != nil {
		t.Fatal(err)
	}
	if err := ns.IP("link set lo up", "address add 192.0.2.1/32 dev lo"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-kick:
	case <-time.After(5 * time.Second):
		t.Fatal("no kick after a routing change")
	}
	if changes.Load() == 0 {
		t.Fatal("a kick without a change counted")
	}
	start := time.Now()
	cancel()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the watcher did not stop with its context")
	}
	t.Logf("stopped %v after its context", time.Since(start))
}
