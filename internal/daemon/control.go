package daemon

import (
	"errors"
	"time"

	"github.com/rerouted/rerouted/internal/control"
	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/usage"
)

// controlSource is what the control socket reports: the daemon's flows and
// uplinks.
type controlSource struct{ d *Daemon }

// Flows lists the translated flows, then the sockets steered at connect().
func (s controlSource) Flows(fn func(control.FlowInfo) error) error {
	d := s.d
	now := time.Now()
	for _, f := range d.flows().Snapshot() {
		if f.Pass {
			continue // a cached decision not to translate: nothing to show
		}
		if err := fn(info(f, now)); err != nil {
			return err
		}
	}
	if st := d.steer.Load(); st != nil {
		if err := st.List(d.cfg.Load(), fn); err != nil {
			d.log.Warn("flows: list the sockets steered at connect()", "err", err)
		}
	}
	return nil
}

// Usage reads the counts afresh: what `rerouted usage` prints is up to
// the moment.
func (s controlSource) Usage() (usage.Report, error) {
	l := s.d.usage
	if l == nil {
		return usage.Report{}, errors.New("usage accounting is off (see the daemon's log for why, or [usage] enabled in the configuration)")
	}
	if err := l.Harvest(false); err != nil {
		s.d.errors[errUsage].Add(1)
		return usage.Report{}, err
	}
	return l.Report(), nil
}

// Uplinks returns each uplink's state in each family, with its live flows.
func (s controlSource) Uplinks() []control.UplinkInfo {
	d := s.d
	cfg := d.cfg.Load()
	type key struct {
		mark uint32
		v6   bool
	}
	flows := map[key]int{}
	for _, f := range d.flows().Snapshot() {
		if !f.Pass {
			flows[key{f.Mark, f.Dst.Addr().Is6()}]++
		}
	}
	var r []control.UplinkInfo
	for _, st := range d.uplinks.List() {
		var mark uint32
		if u := cfg.UplinkByName(st.Uplink); u != nil {
			mark = u.Mark
		}
		r = append(r, control.UplinkInfo{Status: st, Flows: flows[key{mark, st.Family == "ipv6"}]})
	}
	return r
}

func info(f *flow.Flow, now time.Time) control.FlowInfo {
	fi := control.FlowInfo{
		Proto:    f.Proto.String(),
		Original: control.Tuple{Src: f.Src.Addr(), Dst: f.Dst.Addr(), Sport: f.Src.Port(), Dport: f.Dst.Port()},
		Reply:    control.Tuple{Src: f.Dst.Addr(), Dst: f.NewSrc.Addr(), Sport: f.Dst.Port(), Dport: f.NewSrc.Port()},
		Mark:     f.Mark, Dev: f.Dev, UID: f.UID, Rule: f.Rule, Cookie: f.Cookie,
		AgeSeconds: now.Sub(f.Start).Seconds(),
	}
	if o := f.Owner; o != nil {
		fi.PID, fi.Comm, fi.Exe, fi.Cgroup = o.PID, o.Comm, o.Exe, o.Cgroup
	}
	return fi
}
