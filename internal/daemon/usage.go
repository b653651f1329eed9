package daemon

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/owner"
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
// (no cgroup v2, a kernel without the programs' features) runs without
// accounting, and says so: the daemon never stops translating for it.
func (d *Daemon) startUsage(ctx context.Context, cfg *policy.Config, diag sockdiag.Sockets) {
	if d.usageState == nil {
		return
	}
	root, err := owner.Cgroup2Mount("/proc/self/mountinfo")
	if err != nil {
		d.log.Warn("usage accounting is off: it needs cgroup v2", "err", err)
		return
	}
	pin := ""
	if bpffs, err := owner.FindMount("/proc/self/mountinfo", "bpf"); err == nil {
		if fi, err := os.Stat("/proc/self/ns/net"); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				pin = filepath.Join(bpffs, "rerouted", "usage-netns-"+strconv.FormatUint(st.Ino, 10))
			}
		}
	}
	k, err := usage.OpenKernel(root, pin)
	if err != nil {
		d.errors[errUsage].Add(1)
		d.log.Error("usage accounting is off: the kernel refused its programs", "err", err)
		return
	}
	if k.Replaced {
		d.log.Warn("usage: an earlier version's counts of live sockets were of another layout and are lost; the totals of ended sockets stay", "state", cfg.Usage.State)
	}
	owners := owner.NewOwners()
	cgroup := func(id uint64) (string, bool) { // "/" for the root, as rules write it
		p, ok := owners.Cgroup(id)
		if !ok {
			return "", false
		}
		if p = strings.Trim(p, "/"); p == "." {
			p = ""
		}
		return "/" + p, true
	}
	l := usage.NewLedger(k, d.usageState, cfg.Usage.State, d.ruleOf, cgroup)
	l.RetireAfter = 2 * cfg.Usage.Interval
	if err := l.Recover(); err != nil {
		d.errors[errUsage].Add(1)
		d.log.Error("usage: retire the sockets an earlier run had counted", "err", err)
	}
	if !k.Adopted {
		err := k.EnterExisting(diag, func(s *sockdiag.Socket) {
			cg, _ := cgroup(s.CgroupID)
			exe := ""
			if p, ok := owners.Process(s.Inode, s.UID, s.CgroupID); ok {
				exe = p.Exe
			}
			l.NoteOwner(s.Cookie, s.UID, cg, exe)
		})
		if err != nil {
			d.errors[errUsage].Add(1)
			d.log.Error("usage: enter the sockets that exist already; their traffic is not counted", "err", err)
		}
	}
	d.usage = l
	if err := d.countInterfaces(); err != nil {
		d.errors[errUsage].Add(1)
		d.log.Error("usage: the counted interfaces", "err", err)
	}
	if err := l.Harvest(false); err != nil {
		d.errors[errUsage].Add(1)
		d.log.Error("usage: read the counts", "err", err)
	}
	d.checkQuotas(time.Now())
	d.log.Info("usage accounting", "state", cfg.Usage.State, "interval", cfg.Usage.Interval, "adopted", k.Adopted, "since", d.usageState.Since)
	done, watched := make(chan struct{}), make(chan struct{})
	go func() { defer close(done); d.harvestLoop(ctx, cfg.Usage.Interval) }()
	go func() {
		defer close(watched)
		if err := l.WatchCreated(); err != nil {
			d.errors[errUsage].Add(1)
			d.log.Error("usage: new sockets' executables are no longer read; they are known by their comm", "err", err)
		}
	}()
	d.atClose(func() error {
		d.stop()
		<-done
		// The last counts: on removal every socket's (nothing counts
		// them on), on a detach the live ones stay in the kernel.
		err := l.Harvest(!d.detached)
		err = errors.Join(err, l.Save())
		if d.detached {
			err = errors.Join(err, k.Close())
		} else {
			err = errors.Join(err, k.Detach())
		}
		<-watched // ends as the kernel side closes
		return err
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

// harvestLoop reads the counts every interval.
func (d *Daemon) harvestLoop(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := d.countInterfaces(); err != nil {
			d.errors[errUsage].Add(1)
			d.log.Error("usage: the counted interfaces", "err", err)
		}
		if err := d.usage.Harvest(false); err != nil {
			d.errors[errUsage].Add(1)
			d.log.Error("usage: read the counts", "err", err)
			continue
		}
		d.checkQuotas(time.Now())
	}
}

// countInterfaces tells the kernel which interfaces are whose: each
// uplink's (where its marked routes lead), and the host's default routes'
// ("default"). An interface that is both is the uplink's.
func (d *Daemon) countInterfaces() error {
	cfg := d.cfg.Load()
	names := make([]string, len(cfg.Uplinks))
	for i, u := range cfg.Uplinks {
		names[i] = u.Name
	}
	idx := d.usage.Uplinks(names)
	ifs := map[uint32]uint32{}
	defaults, err := uplink.DefaultLinks()
	if err != nil {
		return err
	}
	for ifx := range defaults {
		ifs[uint32(ifx)] = idx[usage.Default]
	}
	for _, st := range d.uplinks.List() {
		if st.Dev == "" {
			continue
		}
		if ifi, err := net.InterfaceByName(st.Dev); err == nil {
			ifs[uint32(ifi.Index)] = idx[st.Uplink]
		}
	}
	for _, u := range cfg.Uplinks {
		if u.Interface == "" {
			continue
		}
		if ifi, err := net.InterfaceByName(u.Interface); err == nil {
			ifs[uint32(ifi.Index)] = idx[u.Name]
		}
	}
	return d.usage.SetInterfaces(ifs)
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

// checkQuotas tells the uplinks' states what each uplink with a quota has
// used of it this period, warns at 90% and at the quota, and acts on an
// uplink that went over it (or came back under it, a new period). It runs
// in the harvest loop alone, which owns quotaWarned.
func (d *Daemon) checkQuotas(now time.Time) {
	cfg := d.cfg.Load()
	for _, u := range cfg.Uplinks {
		if u.Quota == 0 {
			if ts := d.uplinks.SetQuota(u.Mark, 0, 0, now); len(ts) > 0 {
				d.uplinksChanged(ts)
			}
			continue
		}
		start := u.QuotaStart(now)
		used, err := d.usage.QuotaUsed(u.Name, start)
		if err != nil {
			d.errors[errUsage].Add(1)
			d.log.Error("usage: keep the start of a quota period", "uplink", u.Name, "err", err)
		}
		level := 0
		switch {
		case used >= u.Quota:
			level = 2
		case used >= u.Quota/10*9:
			level = 1
		}
		w := d.quotaWarned[u.Name]
		if w.start != start {
			w = quotaWarning{start: start}
		}
		if level > w.level {
			msg := "uplink has used 90% of its quota"
			if level == 2 {
				msg = "uplink is over its quota: new flows take the next uplink"
				if u.ResetOnQuota {
					msg += "; its TCP connections are closed (on_quota = \"reset\")"
				}
			}
			d.log.Warn(msg, "uplink", u.Name, "used_bytes", used, "quota_bytes", u.Quota, "period", u.QuotaPeriod, "since", start)
		}
		w.level = level
		d.quotaWarned[u.Name] = w
		if ts := d.uplinks.SetQuota(u.Mark, used, u.Quota, now); len(ts) > 0 {
			d.uplinksChanged(ts)
		}
	}
}

type quotaWarning struct {
	start time.Time
	level int // 1: warned at 90%; 2: at the quota
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
