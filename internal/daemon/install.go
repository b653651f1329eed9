package daemon

import (
	"os"
	"time"

	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/nftdp"
)

// flowKernel is the flow installer's kernel: each batch of flow changes is
// one nftables transaction on the datapath's flow maps.
type flowKernel struct {
	d     *Daemon
	ops   []nftdp.Op    // reused: the installer applies one batch at a time
	delay time.Duration // tests only: see testDelayEnv
}

// testDelayEnv names a test-only setting: a delay before each transaction,
// to show that SYNs wait for their flow's elements.
const testDelayEnv = "REROUTED_TEST_INSTALL_DELAY"

func newFlowKernel(d *Daemon) *flowKernel {
	k := &flowKernel{d: d}
	if v := os.Getenv(testDelayEnv); v != "" {
		k.delay, _ = time.ParseDuration(v)
	}
	return k
}

// Apply implements flow.Kernel.
func (k *flowKernel) Apply(changes []flow.Change) error {
	if k.delay > 0 {
		time.Sleep(k.delay)
	}
	k.ops = k.ops[:0]
	for _, c := range changes {
		k.ops = append(k.ops, nftdp.Op{Entry: entry(c.Flow), Delete: c.Delete})
	}
	return k.d.dp.Apply(k.ops)
}

// installFailed counts and logs a flow change the kernel refused. A flow
// whose elements could not be installed has left the table; its first
// packet is dropped, and the socket's retransmission is decided again.
func (d *Daemon) installFailed(c flow.Change, err error) {
	f := c.Flow
	switch {
	case c.Delete && benignRemoval(err):
		d.log.Debug("flow's elements were gone already", "src", f.Src, "dst", f.Dst)
	case c.Delete:
		d.errors[errRemove].Add(1)
		d.log.Error("remove flow from kernel", "src", f.Src, "dst", f.Dst, "err", err)
	default:
		d.errors[errInstall].Add(1)
		d.log.Error("install flow in kernel", "src", f.Src, "dst", f.Dst, "new_src", f.NewSrc, "err", err)
	}
}

// entry is a flow's elements, as the datapath writes and lists them.
func entry(f *flow.Flow) nftdp.Entry {
	if f.Pass { // a pass element is the tuple alone: as the kernel lists it
		return nftdp.Entry{Proto: f.Proto, Src: f.Src, Dst: f.Dst, NewSrc: f.Src, Pass: true}
	}
	return nftdp.Entry{Proto: f.Proto, Src: f.Src, Dst: f.Dst, NewSrc: f.NewSrc, Mark: f.Mark}
}
