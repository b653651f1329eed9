// Package steer runs connect-time steering ([daemon] steering = "connect")
// for the daemon: the rules the kernel can decide at connect() are compiled
// into a cgroup BPF program's maps (package connect), which binds a socket
// a rule sends via an uplink to that uplink's address, with its mark. Such
// a socket's packets pass the table's output chain without a decision
// (nftdp.SetSteered). The rest, host marks among them, go the queue's way.
//
// A Steering keeps the program told of the uplinks' states and addresses,
// closes the sockets an uplink's renumbering strands, lists the steered
// sockets for `rerouted flows`, and prints and counts the program's events.
package steer

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/rerouted/rerouted/internal/connect"
	"github.com/rerouted/rerouted/internal/control"
	"github.com/rerouted/rerouted/internal/events"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/nftdp"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"github.com/rerouted/rerouted/internal/uplink"
)

// Deps are what a Steering works with, all the daemon's.
type Deps struct {
	Datapath *nftdp.Datapath
	States   *uplink.States // the uplinks' states, which it publishes
	Events   *events.Writer
	Log      *slog.Logger
	// Moved counts the sockets closed because their address went away, by
	// uplink and how; LookupErrors counts those that could not be closed.
	Moved        *prometheus.CounterVec
	LookupErrors *atomic.Uint64
}

// Steering is the engine and what it was last told.
type Steering struct {
	e       *connect.Engine
	d       Deps
	im      *connect.Image // compiled by Open, installed by Start
	root    string         // the cgroup v2 mount
	pin     string
	mu      sync.Mutex
	uplinks []connect.Uplink // as last published, by the image's uplink index
	// stopMu keeps the counts' readers (a metrics scrape in flight) off
	// the program's maps while Stop closes them.
	stopMu  sync.RWMutex
	stopped bool
}

// Open compiles cfg's image and loads the program (or adopts the one an
// earlier run left pinned); Start makes it decide.
func Open(cfg *policy.Config, deps Deps) (*Steering, error) {
	root, err := cgroupRoot("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	im, err := connect.Compile(cfg, root)
	if err != nil {
		return nil, err
	}
	// Pinned under bpffs, when it is mounted, so that a restart (SIGUSR2,
	// or a crash) leaves the program deciding.
	pin := ""
	if bpffs, err := owner.FindMount("/proc/self/mountinfo", "bpf"); err == nil {
		var st os.FileInfo
		if st, err = os.Stat("/proc/self/ns/net"); err == nil {
			pin = filepath.Join(bpffs, "rerouted", "netns-"+strconv.FormatUint(inode(st), 10))
		}
	}
	e, err := connect.Open(root, pin)
	if err != nil {
		return nil, err
	}
	return &Steering{e: e, d: deps, im: im, root: root, pin: pin}, nil
}

// cgroupRoot is where cgroup v2 is mounted, as mountinfo lists it: none is
// a host without the feature (connect.ErrUnsupported), an unreadable
// mountinfo is a fault.
func cgroupRoot(mountinfo string) (string, error) {
	root, err := owner.Cgroup2Mount(mountinfo)
	if nm := (*owner.NoMountError)(nil); errors.As(err, &nm) {
		return "", &connect.UnsupportedError{Reason: connect.ReasonNoCgroup2, Err: err}
	}
	if err != nil {
		return "", fmt.Errorf("the cgroup v2 mount: %w", err)
	}
	return root, nil
}

// LogFailure says why connect-time steering does not run. Every flow is
// then decided at the queue, which works anywhere: the daemon must not
// break a host for it. What the host is expected to lack (an old kernel,
// no cgroup v2: connect.UnsupportedError) is a warning naming it;
// anything else, a program the verifier refuses among them, is a fault
// and an error.
func LogFailure(log *slog.Logger, err error) {
	var ue *connect.UnsupportedError
	if errors.As(err, &ue) {
		log.Warn("connect-time steering is not available: every new flow is decided at the queue", "reason", ue.Reason, "err", err)
		return
	}
	log.Error("connect-time steering failed: every new flow is decided at the queue", "err", err)
}

// Start gives the program the ephemeral port range, installs the image
// Open compiled and publishes the uplinks (cfg's). On an error the program
// is detached again.
func (s *Steering) Start(cfg *policy.Config, portLo, portHi uint16) error {
	e := s.e
	e.SetEphemeral(portLo, portHi)
	wantEvents := s.d.Events.On(events.Bind | events.Refused)
	e.SetEvents(wantEvents)
	if err := e.Apply(s.im); err != nil {
		e.Detach()
		return err
	}
	if err := s.Publish(cfg); err != nil {
		e.Detach()
		return err
	}
	if wantEvents {
		go func() {
			if err := e.Events(s.steered); err != nil {
				s.d.Log.Error("connect steering: its events are no longer read", "err", err)
			}
		}()
	}
	s.d.Log.Info("connect-time steering: rules the kernel can decide bind their sockets at connect()", "cgroup", s.root, "pinned", s.pin,
		"adopted", e.Adopted)
	return nil
}

// Stop detaches the program, or with keep leaves it pinned and deciding
// for the next run.
func (s *Steering) Stop(keep bool) error {
	s.stopMu.Lock()
	defer s.stopMu.Unlock()
	s.stopped = true
	if keep {
		return s.e.Close()
	}
	return s.e.Detach()
}

// Apply installs a reloaded policy's image and publishes the uplinks.
func (s *Steering) Apply(cfg *policy.Config) error {
	root, _ := owner.Cgroup2Mount("/proc/self/mountinfo")
	im, err := connect.Compile(cfg, root)
	if err == nil {
		err = s.e.Apply(im)
	}
	if err == nil {
		err = s.Publish(cfg)
	}
	return err
}

// Publish tells the program the uplinks' states and addresses, and the
// table which sockets are on their uplink already.
func (s *Steering) Publish(cfg *policy.Config) error {
	us := make([]connect.Uplink, len(cfg.Uplinks))
	var pass []nftdp.Steered
	for i, u := range cfg.Uplinks {
		us[i].Mark = u.Mark
		for fi, v6 := range []bool{false, true} {
			st, ok := s.d.States.Get(u.Mark, v6)
			if !ok || !st.Src.IsValid() {
				continue
			}
			if fi == 0 {
				us[i].Up4, us[i].Addr4 = st.Up, st.Src
			} else {
				us[i].Up6, us[i].Addr6 = st.Up, st.Src
			}
			pass = append(pass, nftdp.Steered{Mark: u.Mark, Addr: st.Src})
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.d.Datapath.SetSteered(pass); err != nil {
		return fmt.Errorf("connect steering: the table's pass for steered sockets: %w", err)
	}
	if err := s.e.SetUplinks(us); err != nil {
		return err
	}
	old := s.uplinks
	s.uplinks = us
	// An uplink renumbered: its sockets bound to an address the host no
	// longer has can never send again. They are closed, so that their
	// applications learn at once and reconnect (on the new address).
	for i, u := range old {
		if i >= len(cfg.Uplinks) {
			break
		}
		for fi, a := range []netip.Addr{u.Addr4, u.Addr6} {
			now := us[i].Addr4
			if fi == 1 {
				now = us[i].Addr6
			}
			if a.IsValid() && a != now && !isLocal(a) {
				s.closeSteered(cfg.Uplinks[i], a, true, "uplink renumbered: closed the sockets bound at connect() to its old address")
			}
		}
	}
	return nil
}

// isLocal reports whether the host still has address a.
func isLocal(a netip.Addr) bool {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return true // cannot tell: close nothing
	}
	for _, x := range addrs {
		if p, ok := x.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(p.IP); ok && ip.Unmap() == a {
				return true
			}
		}
	}
	return false
}

// CloseOn closes the sockets bound at connect() to u's address a, which
// new flows no longer take (a standby uplink held again, an uplink over its
// quota): TCP ones unless reset_tcp = false, so that they reconnect over
// the uplink that takes new flows now. UDP ones carry on: their socket
// keeps its address, which still works.
func (s *Steering) CloseOn(u *policy.Uplink, a netip.Addr, why string) {
	s.closeSteered(u, a, false, why)
}

// closeSteered closes the sockets bound to u's address a: TCP ones unless
// reset_tcp = false, and with udp connected UDP ones (their datagrams
// cannot leave from an address the host no longer has).
func (s *Steering) closeSteered(u *policy.Uplink, a netip.Addr, udp bool, why string) {
	diag, err := sockdiag.OpenSockets() // one per call: the callers are any goroutine
	if err != nil {
		s.d.Log.Error("connect steering: close sockets on an address that went away", "uplink", u.Name, "address", a, "err", err)
		return
	}
	defer diag.Close()
	family := uint8(syscall.AF_INET)
	if a.Is6() {
		family = syscall.AF_INET6
	}
	for _, proto := range []ipproto.Proto{ipproto.TCP, ipproto.UDP} {
		if (proto == ipproto.TCP && u.KeepTCP) || (proto == ipproto.UDP && !udp) {
			continue
		}
		var victims []sockdiag.Socket
		if err := diag.Dump(family, proto, func(so *sockdiag.Socket) {
			if so.Local.Addr().Unmap() == a && so.State != sockdiag.StateListen && so.Remote.Addr().IsValid() && !so.Remote.Addr().IsUnspecified() {
				victims = append(victims, *so)
			}
		}); err != nil {
			s.d.Log.Error("connect steering: list sockets on an address that went away", "uplink", u.Name, "address", a, "err", err)
			continue
		}
		how := "reset"
		if proto == ipproto.UDP {
			how = "closed"
		}
		for _, so := range victims {
			if err := diag.Destroy(proto, so.Local, so.Remote, so.Cookie); err != nil && !errors.Is(err, sockdiag.ErrNotFound) {
				s.d.LookupErrors.Add(1)
				s.d.Log.Error("connect steering: close a socket on an address that went away", "src", so.Local, "dst", so.Remote, "err", err)
				continue
			}
			s.d.Moved.WithLabelValues(u.Name, how).Inc()
		}
		if len(victims) > 0 {
			s.d.Log.Warn(why, "uplink", u.Name, "address", a,
				"proto", proto.String(), "sockets", len(victims))
		}
	}
}

func inode(fi os.FileInfo) uint64 {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

// steered prints the program's event.
func (s *Steering) steered(ev connect.Event) {
	im := s.e.Image()
	rule, up := "?", ""
	if im != nil && ev.Rule < len(im.Rules) {
		rule = im.Rules[ev.Rule].Name
	}
	var src netip.Addr
	s.mu.Lock()
	if ev.Uplink < len(s.uplinks) {
		u := s.uplinks[ev.Uplink]
		src = u.Addr4
		if ev.Dst.Addr().Is6() {
			src = u.Addr6
		}
	}
	s.mu.Unlock()
	if im != nil && ev.Uplink < len(im.Uplinks) {
		up = im.Uplinks[ev.Uplink]
	}
	s.d.Events.Bind(ev, rule, up, src)
}

// List calls fn for each socket on a steered uplink's address: the
// sockets the program bound (and any the application bound there itself,
// which are on their uplink just the same). They are found by a socket
// dump, as they have no flow: rule "at connect", no translation.
func (s *Steering) List(cfg *policy.Config, fn func(control.FlowInfo) error) error {
	type up struct {
		name, dev string
		mark      uint32
	}
	on := map[netip.Addr]up{}
	s.mu.Lock()
	for i, u := range s.uplinks {
		if i >= len(cfg.Uplinks) {
			break
		}
		for fi, a := range []netip.Addr{u.Addr4, u.Addr6} {
			if a.IsValid() {
				st, _ := s.d.States.Get(u.Mark, fi == 1)
				on[a] = up{cfg.Uplinks[i].Name, st.Dev, u.Mark}
			}
		}
	}
	s.mu.Unlock()
	if len(on) == 0 {
		return nil
	}
	diag, err := sockdiag.OpenSockets() // one per call: the callers are any goroutine
	if err != nil {
		return err
	}
	defer diag.Close()
	var ferr error
	for _, q := range []struct {
		family uint8
		proto  ipproto.Proto
	}{
		{syscall.AF_INET, ipproto.TCP}, {syscall.AF_INET6, ipproto.TCP},
		{syscall.AF_INET, ipproto.UDP}, {syscall.AF_INET6, ipproto.UDP},
	} {
		err := diag.Dump(q.family, q.proto, func(so *sockdiag.Socket) {
			u, ok := on[so.Local.Addr().Unmap()]
			if !ok || ferr != nil || so.State == sockdiag.StateListen || !so.Remote.Addr().IsValid() || so.Remote.Addr().IsUnspecified() {
				return
			}
			ferr = fn(control.FlowInfo{Proto: q.proto.String(),
				Original: control.Tuple{Src: so.Local.Addr().Unmap(), Dst: so.Remote.Addr().Unmap(), Sport: so.Local.Port(), Dport: so.Remote.Port()},
				Reply:    control.Tuple{Src: so.Remote.Addr().Unmap(), Dst: so.Local.Addr().Unmap(), Sport: so.Remote.Port(), Dport: so.Local.Port()},
				Mark:     u.mark, Dev: u.dev, UID: so.UID, Rule: "at connect (" + u.name + ")", Cookie: so.Cookie})
		})
		if err != nil {
			return err
		}
		if ferr != nil {
			return ferr
		}
	}
	return nil
}

// Desc describes the program's counts (Collect). result: steered (bound
// to an uplink), default (left to the host's routing), refused (on_down =
// "drop"), stopped (a rule only the daemon can decide: left to the
// queue), bind_failed (bound already: left to the queue), no_match; and
// datagram_source: unconnected UDP datagrams given their uplink's source
// address (sendmsg).
var Desc = prometheus.NewDesc("rerouted_connect_decisions_total",
	"connect() calls the connect-time program decided, by result.",
	[]string{"result"}, nil)

// Collect reports the program's counts.
func (s *Steering) Collect(ch chan<- prometheus.Metric) {
	s.stopMu.RLock()
	defer s.stopMu.RUnlock()
	if s.stopped {
		return
	}
	st, err := s.e.Stats()
	if err != nil {
		s.d.Log.Error("metrics: connect steering counts", "err", err)
		return
	}
	for _, v := range []struct {
		result string
		n      uint64
	}{{"steered", st.Steered}, {"default", st.Default}, {"refused", st.Refused}, {"stopped", st.Stopped},
		{"bind_failed", st.BindFailed}, {"no_match", st.NoMatch}, {"datagram_source", st.Datagrams}} {
		ch <- prometheus.MustNewConstMetric(Desc, prometheus.CounterValue, float64(v.n), v.result)
	}
}

// Steered is how many sockets the program bound to an uplink (0 if its
// counts cannot be read).
func (s *Steering) Steered() uint64 {
	s.stopMu.RLock()
	defer s.stopMu.RUnlock()
	if s.stopped {
		return 0
	}
	st, err := s.e.Stats()
	if err != nil {
		return 0
	}
	return st.Steered
}

// DecidedBy names the rule that bound the socket with cookie at
// connect(), if the program knows it.
func (s *Steering) DecidedBy(cookie uint64) (string, bool) {
	s.stopMu.RLock()
	defer s.stopMu.RUnlock()
	if s.stopped {
		return "", false
	}
	return s.e.DecidedBy(cookie)
}
