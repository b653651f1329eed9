package daemon

import (
	"context"
	"errors"
	"time"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/uplink"
	"github.com/rerouted/rerouted/internal/usage"
)

// Usage accounting ([usage], package usage): the kernel counts each
// socket's packets per uplink; the daemon reads the counts every interval,
// and keeps the totals of ended sockets in the state file.

// loadUsageState reads the state file, before anything is installed: a
// file the daemon refuses stops the start.
func (d *Daemon) loadUsageState(cfg *policy.Config) error {
	if !cfg.Usage.Enabled {
		return nil
	}
	st, err := usage.LoadState(cfg.Usage.State, time.Now())
	if err != nil {
		return err
	}
	d.usageState = st
	return nil
}

// startUsage attaches the accounting programs (or adopts those an earlier
// run left counting), and starts reading them. A host that cannot count
// (no cgroup v2, a kernel that refuses the programs) runs without
// accounting, and says so: the daemon never stops translating for it.
func (d *Daemon) startUsage(ctx context.Context, cfg *policy.Config, diag sockdiag.Sockets) {
	if d.usageState == nil {
		return
	}
	a, err := usage.Open(cfg, d.usageState, diag, usage.Deps{Config: d.cfg.Load, States: &d.uplinks, Rules: d.ruleOf,
		Log: d.log, Errors: &d.errors[errUsage], Changed: d.uplinksChanged})
	if errors.Is(err, usage.ErrNoCgroup2) {
		d.log.Warn("usage accounting is off", "err", err)
		return
	}
	if err != nil {
		d.errors[errUsage].Add(1)
		d.log.Error("usage accounting is off: the kernel refused its programs", "err", err)
		return
	}
	d.usage = a.Ledger
	done := make(chan struct{})
	go func() { defer close(done); a.Run(ctx) }()
	d.atClose(func() error {
		d.stop()
		<-done
		return a.Close(d.detached)
	})
}

// usageReport is the last harvest's report, for the metrics; false when
// accounting is off.
func (d *Daemon) usageReport() (usage.Report, bool) {
	l := d.usage
	if l == nil {
		return usage.Report{}, false
	}
	return l.Report(), true
}

// ruleOf is the ledger's way to name the rule that decided a socket: a
// function over the flows as they are now (read once per harvest), and
// the sockets steered at connect().
func (d *Daemon) ruleOf() func(cookie uint64) string {
	flows := map[uint64]string{}
	for _, f := range d.flows().Snapshot() {
		if f.Cookie != 0 && f.Rule != "" {
			flows[f.Cookie] = f.Rule
		}
	}
	st := d.steer.Load()
	return func(cookie uint64) string {
		if r, ok := flows[cookie]; ok {
			return r
		}
		if st != nil {
			if r, ok := st.DecidedBy(cookie); ok {
				return r
			}
		}
		return ""
	}
}

// uplinksChanged acts on transitions made outside the routing keeper and
// the probes: the engines first, then the announcements.
func (d *Daemon) uplinksChanged(ts []uplink.Transition) {
	d.republish()
	for _, tr := range ts {
		d.uplinkChanged(tr.Status)
	}
}

// closeUplink closes the TCP connections on u, whose new flows go
// elsewhere now (a standby held again, an uplink over its quota), so that
// they reconnect over the uplink that takes them: its translated flows'
// sockets (their UDP and ping flows are decided anew at their next
// packet), and the sockets bound to it at connect().
func (d *Daemon) closeUplink(u *policy.Uplink, st uplink.Status, why string) {
	diag, err := sockdiag.OpenSockets()
	if err != nil {
		d.log.Error("close the connections of an uplink", "uplink", u.Name, "err", err)
		return
	}
	defer diag.Close()
	n := 0
	for _, f := range d.flows().Snapshot() {
		if f.Pass || f.Mark != u.Mark || (f.Dst.Addr().Is6() != (st.Family == "ipv6")) {
			continue
		}
		if f.Proto == ipproto.TCP {
			if u.KeepTCP {
				continue
			}
			if err := diag.Destroy(ipproto.TCP, f.Src, f.Dst, f.Cookie); err != nil && !errors.Is(err, sockdiag.ErrNotFound) && !errors.Is(err, sockdiag.ErrCannotDestroy) {
				d.log.Error("close a connection of an uplink", "uplink", u.Name, "src", f.Src, "dst", f.Dst, "err", err)
				continue
			}
			n++
		}
		d.shared.Forget(f)
	}
	if s := d.steer.Load(); s != nil && st.Src.IsValid() {
		s.CloseOn(u, st.Src, why+": closed the TCP connections bound at connect()")
	}
	if n > 0 {
		d.log.Warn(why+": closed its translated TCP connections", "uplink", u.Name, "family", st.Family, "connections", n)
	}
}
