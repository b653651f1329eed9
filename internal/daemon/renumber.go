package daemon

import (
	"errors"
	"net/netip"

	"github.com/rerouted/rerouted/internal/daemon/metrics"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/packet"
	"github.com/rerouted/rerouted/internal/route"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/uplink"
)

// A translated flow's wire source is an uplink's address. When that address
// goes away (a DHCP or PPPoE client renumbers the uplink), the flow must
// not go on leaving with it: the kernel datapath already drops such packets
// (nftdp.StaleMark), and here each such flow is moved:
//   - UDP and ping flows are forgotten: their next packet comes to the
//     daemon again and is decided anew, with the uplink's new address, so
//     a tunnel or a QUIC connection carries on from it;
//   - a TCP connection cannot change its address: its socket is destroyed
//     (SOCK_DESTROY) so that the application learns at once, rather than
//     after minutes of retransmissions; with reset_tcp = false only its
//     translation is removed.

// moveStale moves the flows whose wire source is no longer the host's.
func (d *Daemon) moveStale(r *uplink.Routing, diag sockdiag.Sockets, rt *route.Cache) {
	local, err := r.LocalAddrs()
	if err != nil {
		d.errors[errRepair].Add(1)
		d.log.Error("check flows' addresses", "err", err)
		return
	}
	cfg := d.cfg.Load()
	names := map[uint32]string{}
	for _, u := range cfg.Uplinks {
		names[u.Mark] = u.Name
	}
	for _, f := range d.flows().Snapshot() {
		if f.Pass || local[f.NewSrc.Addr()] {
			continue
		}
		name := metrics.UplinkName(names, f)
		how := "redecided"
		if f.Proto == ipproto.TCP {
			how = "reset"
			if u := cfg.UplinkByMark(f.Mark); u != nil && u.KeepTCP {
				how = "removed"
			} else if err := diag.Destroy(ipproto.TCP, f.Src, f.Dst, f.Cookie); errors.Is(err, sockdiag.ErrCannotDestroy) {
				// A TIME_WAIT socket on a kernel before 6.0: it sends
				// nothing of its own; its element goes.
				d.log.Debug("a connection whose address went away cannot be closed; its translation is removed", "src", f.Src, "dst", f.Dst, "err", err)
				how = "removed"
			} else if err != nil && !errors.Is(err, sockdiag.ErrNotFound) {
				d.shared.Stats.Errors[packet.ErrSocketLookup].Add(1)
				d.log.Error("close a connection whose address went away", "src", f.Src, "dst", f.Dst, "wire", f.NewSrc, "err", err)
				how = "removed"
			}
		}
		d.shared.Forget(f)
		d.metrics.Moved.WithLabelValues(name, how).Inc()
		to := netip.Addr{}
		if how == "redecided" {
			if r, err := rt.Lookup(f.Dst.Addr(), f.Mark, f.UID, f.Cookie != 0); err == nil {
				to = r.Src
			}
		}
		d.shared.Events.Move(f, how, to)
		d.log.Warn("a flow's source address went away; moved it", "proto", f.Proto.String(), "src", f.Src, "dst", f.Dst,
			"gone", f.NewSrc.Addr(), "how", how, "next_src", to, "uplink", name)
	}
}
