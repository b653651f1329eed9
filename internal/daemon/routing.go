package daemon

import (
	"context"
	"strings"
	"time"

	"github.com/rerouted/rerouted/internal/route"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/uplink"
)

// keepRouting puts back managed uplinks' routes and rules that were
// removed behind rerouted's back, after each burst of routing changes: the
// kernel drops a table's default route when its link goes down, and
// network managers delete rules they do not know. What cannot go back yet
// (a link still down) is tried again at the next change, such as the link
// coming up.
//
// It owns r's socket, diag and rt while it runs.
func (d *Daemon) keepRouting(ctx context.Context, r *uplink.Routing, diag sockdiag.Sockets, rt *route.Cache, changed <-chan struct{}) {
	waiting := map[string]bool{} // pending items already logged
	for {
		select {
		case <-ctx.Done():
			return
		case <-changed:
		}
		// Let a burst (a link going down takes its routes and addresses)
		// settle: one check for all of it.
		select {
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
		select {
		case <-changed:
		default:
		}
		restored, pending, err := r.Ensure()
		if err != nil {
			d.errors[errRepair].Add(1)
			d.log.Error("check managed uplink routing", "err", err)
		}
		for _, what := range restored {
			kind := "route"
			if strings.HasPrefix(what, "rule ") {
				kind = "ip_rule"
			}
			d.metrics.Repairs.WithLabelValues(kind).Inc()
			d.log.Warn("managed uplink routing was removed; put it back", "what", what)
			delete(waiting, what)
		}
		now := map[string]bool{}
		for _, p := range pending {
			now[p] = true
			if !waiting[p] {
				d.log.Warn("managed uplink routing is missing and cannot be put back yet; retrying at the next routing change", "what", p)
			}
		}
		waiting = now
		// The states first: new flows choose by them.
		transitions, err := r.UpdateStates(&d.uplinks, d.cfg.Load().Uplinks, time.Now())
		if err != nil {
			d.errors[errRepair].Add(1)
			d.log.Error("read uplink states", "err", err)
		}
		// The connect-time program next, then the announcement: once the
		// daemon says an uplink is down, both engines act on it.
		d.republish()
		for _, tr := range transitions {
			d.uplinkChanged(tr.Status)
		}
		d.moveStale(r, diag, rt)
	}
}

// uplinkChanged tells of an uplink's transition: a WARNING, the debug
// stream, the metrics.
func (d *Daemon) uplinkChanged(st uplink.Status) {
	d.metrics.Transitions.WithLabelValues(st.Uplink, st.Family).Inc()
	d.shared.Events.Uplink(st)
	if st.Up {
		d.log.Warn("uplink is up", "uplink", st.Uplink, "family", st.Family)
		return
	}
	if st.Standby {
		d.log.Warn("standby uplink is held: new flows take the primary again", "uplink", st.Uplink, "family", st.Family, "why", st.Why)
	} else {
		d.log.Warn("uplink is down: rules choose their next uplink, host marks their fallback", "uplink", st.Uplink, "family", st.Family, "why", st.Why)
	}
	// A standby held again, or an uplink over its quota with on_quota =
	// "reset", still works: its TCP connections are closed so that they
	// reconnect over the uplink new flows take.
	u := d.cfg.Load().UplinkByName(st.Uplink)
	switch {
	case u == nil:
	case st.Standby:
		d.closeUplink(u, st, "standby uplink held again")
	case u.ResetOnQuota && u.Quota > 0 && st.QuotaUsed >= st.Quota:
		d.closeUplink(u, st, "uplink over its quota")
	}
}
