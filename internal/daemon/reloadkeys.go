package daemon

import (
	"fmt"
	"slices"

	"github.com/rerouted/rerouted/internal/policy"
)

// restartKeys names the changes a reload cannot apply, because what they
// configure is set up once, at the start: every [daemon] key, an uplink's
// [uplink.health] and managed routing (its probes and routes), and an
// uplink with either that is added or removed. A reload with any of them
// is refused, so that the running daemon never claims values it does not
// use. Rules, and uplinks' marks, fallbacks and reset_tcp, change at once.
func restartKeys(old, cfg *policy.Config) []string {
	var keys []string
	o, n := old.Daemon, cfg.Daemon
	for _, k := range []struct {
		key     string
		changed bool
	}{
		{"queue", o.Queue != n.Queue}, {"queues", o.Queues != n.Queues},
		{"honor_marks", o.HonorMarks != n.HonorMarks}, {"control_socket", o.ControlSocket != n.ControlSocket},
		{"gc_interval", o.GCInterval != n.GCInterval}, {"idle_timeout", o.IdleTimeout != n.IdleTimeout},
		{"datapath", o.Datapath != n.Datapath}, {"metrics_listen", o.MetricsListen != n.MetricsListen},
		{"on_failure", o.FailClosed != n.FailClosed}, {"steering", o.Steering != n.Steering},
		{"new_flows_per_uid", o.NewFlowsPerUID != n.NewFlowsPerUID},
		{"host_marks", o.HostMarks != n.HostMarks},
	} {
		if k.changed {
			keys = append(keys, "daemon."+k.key)
		}
	}
	if old.Usage != cfg.Usage {
		keys = append(keys, "[usage]")
	}
	startOnly := func(u *policy.Uplink) bool { return u.Health != nil || u.Managed() }
	for _, u := range cfg.Uplinks {
		ou := old.UplinkByName(u.Name)
		if ou == nil {
			if startOnly(u) {
				keys = append(keys, fmt.Sprintf("uplink %q (added, with [uplink.health] or managed routing)", u.Name))
			}
			continue
		}
		p := fmt.Sprintf("uplink %q ", u.Name)
		switch {
		case (ou.Health == nil) != (u.Health == nil):
			keys = append(keys, p+"[uplink.health]")
		case u.Health != nil:
			oh, h := ou.Health, u.Health
			for _, k := range []struct {
				key     string
				changed bool
			}{
				{"targets", !slices.Equal(oh.Targets, h.Targets)}, {"interval", oh.Interval != h.Interval},
				{"timeout", oh.Timeout != h.Timeout}, {"down_after", oh.DownAfter != h.DownAfter},
				{"up_after", oh.UpAfter != h.UpAfter},
			} {
				if k.changed {
					keys = append(keys, p+"health."+k.key)
				}
			}
		}
		for _, k := range []struct {
			key     string
			changed bool
		}{
			{"interface", ou.Interface != u.Interface}, {"gateway", ou.Gateway != u.Gateway || ou.GatewayAuto[0] != u.GatewayAuto[0]},
			{"gateway6", ou.Gateway6 != u.Gateway6 || ou.GatewayAuto[1] != u.GatewayAuto[1]}, {"table", ou.Table != u.Table},
		} {
			if k.changed {
				keys = append(keys, p+k.key)
			}
		}
	}
	for _, ou := range old.Uplinks {
		if cfg.UplinkByName(ou.Name) == nil && startOnly(ou) {
			keys = append(keys, fmt.Sprintf("uplink %q (removed, with [uplink.health] or managed routing)", ou.Name))
		}
	}
	return keys
}
