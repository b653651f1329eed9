package usage

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/uplink"
)

// Deps are what accounting works with, all the daemon's.
type Deps struct {
	Config func() *policy.Config
	States *uplink.States // the uplinks' states: where their interfaces are, and their quotas' holds
	// Rules makes the way to name the rule that decided a socket, once
	// per harvest that needs it.
	Rules  func() func(cookie uint64) string
	Log    *slog.Logger
	Errors *atomic.Uint64 // the daemon's count of errors of kind usage
	// Changed acts on the uplinks' transitions a quota made (the engines,
	// the announcements).
	Changed func([]uplink.Transition)
}

// Accounting is usage accounting as the daemon runs it: the kernel's
// programs, the ledger over them, the harvests and the quotas.
type Accounting struct {
	Ledger *Ledger
	k      *Kernel
	d      Deps
	every  time.Duration
	warned map[string]quotaWarning // the harvest loop's
	// notCounted: the sockets not counted as of the last warning (the
	// harvest loop's).
	notCounted uint64
	socksSize  uint32 // the kernel's map of counted sockets holds this many
	// watched is closed when the watcher of new sockets ends, which
	// Close makes it do.
	watched chan struct{}
}

type quotaWarning struct {
	start time.Time
	level int // 1: warned at 90%; 2: at the quota
}

// ErrNoCgroup2 is Open's error on a host without cgroup v2: accounting
// is off there, which is expected of some hosts.
var ErrNoCgroup2 = errors.New("usage accounting needs cgroup v2")

// Open attaches the accounting programs (or adopts those an earlier run
// left counting), with st, the state file as read, and enters the
// namespace's sockets that exist already (diag, for this call only).
func Open(cfg *policy.Config, st *State, diag sockdiag.Sockets, d Deps) (*Accounting, error) {
	root, err := owner.Cgroup2Mount("/proc/self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoCgroup2, err)
	}
	pin := ""
	if bpffs, err := owner.FindMount("/proc/self/mountinfo", "bpf"); err == nil {
		if fi, err := os.Stat("/proc/self/ns/net"); err == nil {
			if s, ok := fi.Sys().(*syscall.Stat_t); ok {
				pin = filepath.Join(bpffs, "rerouted", "usage-netns-"+strconv.FormatUint(s.Ino, 10))
			}
		}
	}
	k, err := OpenKernel(root, pin)
	if err != nil {
		return nil, err
	}
	if k.Replaced {
		d.Log.Warn("usage: an earlier version's counts of live sockets were of another layout and are lost; the totals of ended sockets stay", "state", cfg.Usage.State)
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
	a := &Accounting{k: k, d: d, every: cfg.Usage.Interval, warned: map[string]quotaWarning{}, watched: make(chan struct{}),
		Ledger: NewLedger(k, st, cfg.Usage.State, d.Rules, cgroup)}
	a.Ledger.RetireAfter = 2 * cfg.Usage.Interval
	a.socksSize = k.objs.Socks.MaxEntries()
	if err := a.Ledger.Recover(); err != nil {
		a.fault("usage: retire the sockets an earlier run had counted", err)
	}
	if !k.Adopted {
		err := k.EnterExisting(diag, func(s *sockdiag.Socket) {
			cg, _ := cgroup(s.CgroupID)
			exe := ""
			if p, ok := owners.Process(s.Inode, s.UID, s.CgroupID); ok {
				exe = p.Exe
			}
			a.Ledger.NoteOwner(s.Cookie, s.UID, cg, exe)
		})
		if err != nil {
			a.fault("usage: enter the sockets that exist already; their traffic is not counted", err)
		}
	}
	a.harvest(time.Now())
	// The state file exists from the start: when counting began, and the
	// uplinks' indexes, must survive a crash before the first socket
	// retires (a harvest writes it only then).
	if err := a.Ledger.Save(); err != nil {
		a.fault("usage: write the state file", err)
	}
	d.Log.Info("usage accounting", "state", cfg.Usage.State, "interval", cfg.Usage.Interval, "adopted", k.Adopted, "since", st.Since)
	return a, nil
}

func (a *Accounting) fault(msg string, err error) {
	a.d.Errors.Add(1)
	a.d.Log.Error(msg, "err", err)
}

// Run reads the counts every interval until ctx is done, and the new
// sockets' executables as they come until Close.
func (a *Accounting) Run(ctx context.Context) {
	go func() {
		defer close(a.watched)
		if err := a.Ledger.WatchCreated(); err != nil {
			a.fault("usage: new sockets' executables are no longer read; they are known by their comm", err)
		}
	}()
	t := time.NewTicker(a.every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			a.harvest(now)
		}
	}
}

// Close reads the last counts: with removal every socket's (nothing
// counts them on), and removes the programs; on a detach the live ones
// stay counting in the kernel for the next run. Call it after Run
// returned.
func (a *Accounting) Close(detach bool) error {
	err := a.Ledger.Harvest(!detach)
	err = errors.Join(err, a.Ledger.Save())
	if detach {
		err = errors.Join(err, a.k.Close())
	} else {
		err = errors.Join(err, a.k.Detach())
	}
	select { // the watcher ends as the kernel side closes, if Run started it
	case <-a.watched:
	case <-time.After(5 * time.Second):
	}
	return err
}

// harvest tells the kernel which interfaces are whose, reads the counts,
// and checks the quotas.
func (a *Accounting) harvest(now time.Time) {
	if err := a.countInterfaces(); err != nil {
		a.fault("usage: the counted interfaces", err)
	}
	if err := a.Ledger.Harvest(false); err != nil {
		a.fault("usage: read the counts", err)
		return
	}
	a.reportNotCounted(a.Ledger.Report().SocketsNotCounted)
	a.checkQuotas(now)
}

// reportNotCounted logs, at WARNING, each rise of the count of sockets
// the kernel could not enter (n, since the programs were loaded): their
// traffic is not counted (the metric has the count).
func (a *Accounting) reportNotCounted(n uint64) {
	if n <= a.notCounted {
		return
	}
	a.d.Log.Warn("usage: sockets could not be entered in the kernel's accounting (its map of sockets is full): their traffic is not counted",
		"sockets", n-a.notCounted, "total", n, "map_size", a.socksSize)
	a.notCounted = n
}

// countInterfaces tells the kernel which interfaces are whose: each
// uplink's (where its marked routes lead), and the host's default routes'
// ("default"). An interface that is both is the uplink's.
func (a *Accounting) countInterfaces() error {
	cfg := a.d.Config()
	names := make([]string, len(cfg.Uplinks))
	for i, u := range cfg.Uplinks {
		names[i] = u.Name
	}
	idx := a.Ledger.Uplinks(names)
	ifs := map[uint32]uint32{}
	defaults, err := uplink.DefaultLinks()
	if err != nil {
		return err
	}
	for ifx := range defaults {
		ifs[uint32(ifx)] = idx[Default]
	}
	for _, st := range a.d.States.List() {
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
	return a.Ledger.SetInterfaces(ifs)
}

// checkQuotas tells the uplinks' states what each uplink with a quota has
// used of it this period, warns at 90% and at the quota, and has the
// daemon act on an uplink that went over it (or came back under it, in a
// new period).
func (a *Accounting) checkQuotas(now time.Time) {
	for _, u := range a.d.Config().Uplinks {
		if u.Quota == 0 {
			if ts := a.d.States.SetQuota(u.Mark, 0, 0, now); len(ts) > 0 {
				a.d.Changed(ts)
			}
			continue
		}
		start := u.QuotaStart(now)
		used, err := a.Ledger.QuotaUsed(u.Name, start)
		if err != nil {
			a.fault("usage: keep the start of a quota period", err)
		}
		level := 0
		switch {
		case used >= u.Quota:
			level = 2
		case used >= u.Quota/10*9:
			level = 1
		}
		w := a.warned[u.Name]
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
			a.d.Log.Warn(msg, "uplink", u.Name, "used_bytes", used, "quota_bytes", u.Quota, "period", u.QuotaPeriod, "since", start)
		}
		w.level = level
		a.warned[u.Name] = w
		if ts := a.d.States.SetQuota(u.Mark, used, u.Quota, now); len(ts) > 0 {
			a.d.Changed(ts)
		}
	}
}
