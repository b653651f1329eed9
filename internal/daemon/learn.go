package daemon

import (
	"bytes"
	"context"
	"errors"
	"net/netip"
	"slices"
	"time"

	"github.com/rerouted/rerouted/internal/nflog"
	"github.com/rerouted/rerouted/internal/nftdp"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/packet"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/uplink"
)

// Host marks decided by the kernel (nftdp's hostmark.go): the daemon tells
// the table which uplinks' marks it decides (publishHostMarks, on every
// change of the uplinks' states), and learns of each flow it decided from
// the NFLOG group (packet.Learner).

// nflogRcvbuf holds a burst of the kernel's records: 200,000 new flows a
// second for a second, at about 200 bytes each.
const nflogRcvbuf = 32 << 20

// startLearning binds the NFLOG group and starts the learner; the function
// it returns stops both.
func (d *Daemon) startLearning(ctx context.Context) (func() error, error) {
	// Records come in batches (32, or what 10 ms gathered): a wakeup per
	// batch, not per flow, which connections opened in parallel feel. A
	// first packet of the path that finds no flow the kernel decided waits
	// for the batch (packet.learnerWaits).
	g, err := nflog.Open(nftdp.LogGroup, nflog.Options{Rcvbuf: nflogRcvbuf, Batch: 32, Flush: 10 * time.Millisecond})
	if err != nil {
		return nil, err
	}
	diag, err := sockdiag.Open()
	if err != nil {
		g.Close()
		return nil, err
	}
	l := packet.NewLearner(d.shared, diag, owner.NewOwners())
	described := make(chan struct{})
	go func() { defer close(described); l.Describe() }()
	g.Start(ctx, func(r *nflog.Record) {
		switch {
		case bytes.HasPrefix(r.Prefix, []byte(nftdp.LogNew)):
			wire, err := netip.ParseAddr(string(r.Prefix[len(nftdp.LogNew):]))
			if err != nil {
				d.shared.Stats.Errors[packet.ErrLearn].Add(1)
				d.log.Error("a flow the kernel decided: unreadable log prefix", "prefix", string(r.Prefix))
				return
			}
			l.Decided(r.Payload, r.Mark, r.UID, wire)
		case bytes.Equal(r.Prefix, []byte(nftdp.LogTaken)):
			l.Taken(r.Payload)
		}
	}, func(err error) {
		d.shared.Stats.Errors[packet.ErrLearn].Add(1)
		if errors.Is(err, nflog.ErrLost) {
			d.log.Warn("records of flows the kernel decided were lost; the sweeper reads them from the table", "err", err)
			d.sweeper.Resync()
			return
		}
		d.log.Error("the kernel's decisions: receive", "err", err)
	})
	return func() error {
		err := g.Close() // the reader has stopped: nothing more for Describe
		l.Close()
		<-described
		return errors.Join(err, diag.Close())
	}, nil
}

// republish tells both the connect-time program and the table's kernel
// decisions the uplinks' states, after a burst of routing changes or a
// probe's verdicts.
func (d *Daemon) republish() {
	d.republishSteering()
	d.publishHostMarks()
}

// publishHostMarks makes the marks of the uplinks that are up the ones the
// kernel decides, each with its current source address and MSS.
func (d *Daemon) publishHostMarks() {
	cfg := d.cfg.Load()
	if d.dp == nil || d.dp.HostMarkErr != nil || d.shared.Userspace || !cfg.Daemon.HonorMarks || cfg.Daemon.HostMarks != "kernel" {
		return
	}
	hm := hostMarks(cfg, &d.uplinks)
	if err := d.dp.SetHostMarks(hm); err != nil {
		d.errors[errInstall].Add(1)
		d.log.Error("the kernel's decisions of host marks: publish uplink states", "err", err)
		return
	}
	k := &packet.KernelDecisions{}
	for _, h := range hm {
		k.Uplinks = append(k.Uplinks, packet.KernelUplink{Mark: h.Mark, Addr: h.Addr})
	}
	d.shared.Kernel.Store(k)
}

// hostMarks lists the uplinks whose marks the kernel decides: those up, in
// each family, with their marked route's preferred source.
func hostMarks(cfg *policy.Config, states *uplink.States) []nftdp.HostMark {
	var hm []nftdp.HostMark
	for _, u := range cfg.Uplinks {
		for _, v6 := range []bool{false, true} {
			st, ok := states.Get(u.Mark, v6)
			if !ok || !st.Up || !st.Src.IsValid() {
				continue
			}
			hm = append(hm, nftdp.HostMark{Mark: u.Mark, Addr: st.Src, MSS: packet.MSS(st.MTU, v6)})
		}
	}
	slices.SortFunc(hm, func(a, b nftdp.HostMark) int { return a.Addr.Compare(b.Addr) })
	return hm
}

// hostMarksWhere says, for the ready line, who decides host marks.
func hostMarksWhere(dp *nftdp.Datapath, cfg *policy.Config) string {
	switch {
	case !cfg.Daemon.HonorMarks:
		return "ignored"
	case dp.HostMarkErr != nil, cfg.Daemon.HostMarks != "kernel":
		return "queue"
	}
	return "kernel"
}
