package connect

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/nftdp"
	"github.com/rerouted/rerouted/internal/policy"
	"golang.org/x/sys/unix"
)

// Engine is the loaded program, its maps and its attachments. Apply and
// SetUplinks may be called from any goroutine; Events from one.
type Engine struct {
	mu      sync.Mutex
	objs    connectObjects
	links   []link.Link
	reader  *ringbuf.Reader // Events'
	pinDir  string          // "" when not pinned
	netns   uint64
	gen     uint32 // active rules generation
	ugen    uint32 // active uplinks generation
	nrules  uint32
	image   *Image
	portLo  uint16 // the ephemeral ports (SetEphemeral)
	portHi  uint16
	emit    bool // events wanted (SetEvents)
	Adopted bool // the programs and maps of an earlier run were taken over
}

// Uplink is an uplink's state as the kernel program needs it.
type Uplink struct {
	Mark     uint32
	Up4, Up6 bool
	Addr4    netip.Addr // the address its sockets are bound to, IPv4
	Addr6    netip.Addr
}

// ErrUnsupported is what an *UnsupportedError is: the host lacks what
// connect-time steering needs, which is expected of some hosts (the daemon
// then decides at the queue, and says so as a warning). Any other error
// from Open or Probe (the verifier refusing the program, an attach that
// fails) is a fault.
var ErrUnsupported = errors.New("connect-time steering is not supported here")

// The reasons a host may lack connect-time steering, and the only ones.
const (
	// ReasonKernel: the kernel has no SO_NETNS_COOKIE (Linux < 5.14).
	ReasonKernel = "Linux < 5.14 (no SO_NETNS_COOKIE)"
	// ReasonNoCgroup2: no cgroup v2 file system is mounted.
	ReasonNoCgroup2 = "no cgroup v2 mount"
)

// UnsupportedError names what the host lacks (Reason, one of the Reason
// constants) and the error that showed it.
type UnsupportedError struct {
	Reason string
	Err    error
}

func (e *UnsupportedError) Error() string {
	return ErrUnsupported.Error() + ": " + e.Reason + ": " + e.Err.Error()
}
func (e *UnsupportedError) Unwrap() error        { return e.Err }
func (e *UnsupportedError) Is(target error) bool { return target == ErrUnsupported }

// checkCookie reads the namespace's cookie: a kernel without the socket
// option (ENOPROTOOPT) lacks the feature; any other error is one.
func checkCookie() (uint64, error) {
	c, err := netnsCookie()
	return c, cookieError(err)
}

func cookieError(err error) error {
	if errors.Is(err, unix.ENOPROTOOPT) {
		return &UnsupportedError{Reason: ReasonKernel, Err: err}
	}
	if err != nil {
		return fmt.Errorf("the network namespace's cookie (SO_NETNS_COOKIE): %w", err)
	}
	return nil
}

// Open loads the program and attaches it at the cgroup v2 root
// (cgroupRoot), for this network namespace's sockets only. With pinDir,
// the links and maps are pinned there, and a run that finds them adopts
// them: sockets connecting meanwhile were decided by the earlier run's
// policy, never by none.
func Open(cgroupRoot, pinDir string) (*Engine, error) {
	netns, err := checkCookie()
	if err != nil {
		return nil, err
	}
	spec, err := loadConnect()
	if err != nil {
		return nil, err
	}
	e := &Engine{netns: netns, pinDir: pinDir}
	opts := &ebpf.CollectionOptions{}
	if pinDir != "" {
		if err := os.MkdirAll(pinDir, 0o700); err != nil {
			return nil, fmt.Errorf("bpf pin directory: %w", err)
		}
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinByName
		}
		opts.Maps.PinPath = pinDir
	}
	if err := spec.LoadAndAssign(&e.objs, opts); err != nil {
		return nil, loadError(err)
	}
	// An adopted conf says which generations are active.
	var c connectConf
	if err := e.objs.Settings.Lookup(uint32(0), &c); err == nil && c.Netns == netns && c.Nrules > 0 {
		e.gen, e.ugen, e.nrules, e.Adopted = c.RulesGen, c.UplinksGen, c.Nrules, true
	}
	for _, p := range []struct {
		prog *ebpf.Program
		typ  ebpf.AttachType
		name string
	}{{e.objs.Connect4, ebpf.AttachCGroupInet4Connect, "connect4"}, {e.objs.Connect6, ebpf.AttachCGroupInet6Connect, "connect6"},
		{e.objs.Sendmsg4, ebpf.AttachCGroupUDP4Sendmsg, "sendmsg4"}, {e.objs.Sendmsg6, ebpf.AttachCGroupUDP6Sendmsg, "sendmsg6"}} {
		var l link.Link
		pin := ""
		if pinDir != "" {
			pin = filepath.Join(pinDir, "link_"+p.name)
			if old, err := link.LoadPinnedLink(pin, nil); err == nil {
				// The earlier run's link: point it at this run's program.
				if err := old.Update(p.prog); err != nil {
					old.Close()
					e.Close()
					return nil, fmt.Errorf("adopt %s: %w", pin, err)
				}
				e.links = append(e.links, old)
				continue
			}
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupRoot, Attach: p.typ, Program: p.prog})
		if err != nil {
			e.Close()
			return nil, fmt.Errorf("attach %s at %s: %w", p.name, cgroupRoot, err)
		}
		if pin != "" {
			if err := l.Pin(pin); err != nil {
				l.Close()
				e.Close()
				return nil, fmt.Errorf("pin %s: %w", pin, err)
			}
		}
		e.links = append(e.links, l)
	}
	return e, nil
}

// Probe says whether this kernel can steer at connect(): the namespace
// cookie, and the verifier's word on the program. Nothing is attached.
func Probe() error {
	if _, err := checkCookie(); err != nil {
		return err
	}
	var objs connectObjects
	if err := loadConnectObjects(&objs, nil); err != nil {
		return loadError(err)
	}
	return objs.Close()
}

// loadError says why the program did not load: on a kernel that has the
// namespace cookie, a refusal is a fault of the program, not of the host.
func loadError(err error) error {
	var ve *ebpf.VerifierError
	if errors.As(err, &ve) {
		return fmt.Errorf("the verifier refused the program: %w", err)
	}
	return fmt.Errorf("load: %w", err)
}

// netnsCookie is the calling thread's network namespace cookie.
func netnsCookie() (uint64, error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return 0, err
	}
	defer unix.Close(fd)
	var c uint64
	l := uint32(8)
	const soNetnsCookie = 71
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, soNetnsCookie, uintptr(unsafe.Pointer(&c)), uintptr(unsafe.Pointer(&l)), 0)
	if errno != 0 {
		return 0, errno
	}
	return c, nil
}

// Apply installs im as the active policy: the inactive generation is
// filled, then made active in one map write, then the old one emptied. A
// connect() sees the old policy or the new one, never a mix.
func (e *Engine) Apply(im *Image) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	next := 1 - e.gen
	if err := e.fill(next, im); err != nil {
		e.clear(next)
		return err
	}
	old, oldImage := e.gen, e.image
	e.image = im
	if err := e.writeConf(next, e.ugen, uint32(len(im.Rules))); err != nil {
		e.image = oldImage
		e.clear(next)
		return err
	}
	e.gen, e.nrules = next, uint32(len(im.Rules))
	e.clear(old)
	return nil
}

// SetEphemeral tells the program the kernel's ephemeral port range
// (net.ipv4.ip_local_port_range): an unconnected socket bound to a port
// outside it is a local service's, whose datagrams it leaves to the daemon.
// Call it before Apply.
func (e *Engine) SetEphemeral(lo, hi uint16) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.portLo, e.portHi = lo, hi
}

// SetEvents says whether the program writes an event per decision (the
// debug stream reads them): without a reader, each would wake the daemon
// for nothing. Call it before Apply.
func (e *Engine) SetEvents(on bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.emit = on
}

// Image is the policy in force.
func (e *Engine) Image() *Image {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.image
}

func (e *Engine) writeConf(gen, ugen, nrules uint32) error {
	c := connectConf{Netns: e.netns, Nrules: nrules, RulesGen: gen, UplinksGen: ugen, ProbePriority: nftdp.ProbePriority,
		PortLo: uint32(e.portLo), PortHi: uint32(e.portHi)}
	if e.emit {
		c.Emit = 1
	}
	if e.image != nil && e.image.HonorMarks {
		c.HonorMarks = 1
	}
	if err := e.objs.Settings.Put(uint32(0), &c); err != nil {
		return fmt.Errorf("connect steering: settings: %w", err)
	}
	return nil
}

func (e *Engine) fill(gen uint32, im *Image) error {
	for i := range im.Rules {
		r := &im.Rules[i]
		ri := gen*MaxRules + uint32(i)
		var name connectRuleName
		for j := 0; j < len(r.Name) && j < len(name.Name)-1; j++ {
			name.Name[j] = int8(r.Name[j])
		}
		if err := e.objs.RuleNames.Put(ri, &name); err != nil {
			return fmt.Errorf("connect steering: rule %q: name: %w", r.Name, err)
		}
		kr := connectRule{Flags: r.Flags, Protos: r.Protos, Action: r.Action, Nchoices: uint8(len(r.Choices))}
		if r.DropWhenDown {
			kr.DropWhenDown = 1
		}
		for j, ch := range r.Choices {
			kr.Choice[j] = ch
			if j < len(r.Weights) {
				kr.Weight[j] = r.Weights[j]
				kr.TotalWeight += r.Weights[j]
			}
		}
		if err := e.objs.RuleTable.Put(ri, &kr); err != nil {
			return fmt.Errorf("connect steering: rule %q: %w", r.Name, err)
		}
		for neg, ps := range [][]netip.Prefix{r.Dst, r.NotDst} {
			for _, p := range ps {
				k := lpmKey(ri, neg == 1, p)
				if err := e.objs.Dsts.Put(&k, uint8(1)); err != nil {
					return fmt.Errorf("connect steering: rule %q: dst %s: %w", r.Name, p, err)
				}
			}
		}
		for neg, rs := range [][]policy.PortRange{r.Dports, r.NotDports} {
			if rs == nil {
				continue
			}
			var bm [8192]byte
			for _, pr := range rs {
				for p := int(pr.Lo); p <= int(pr.Hi); p++ {
					bm[p>>3] |= 1 << (p & 7)
				}
			}
			if err := e.objs.Ports.Put(ri*2+uint32(neg), &bm); err != nil {
				return fmt.Errorf("connect steering: rule %q: ports: %w", r.Name, err)
			}
		}
		for kind, ids := range [][]uint32{r.UIDs, r.NotUIDs, r.GIDs, r.NotGIDs} {
			for _, id := range ids {
				if err := e.objs.Ids.Put(&connectIdKey{Rule: ri, Kind: uint32(kind), Id: id}, uint8(1)); err != nil {
					return fmt.Errorf("connect steering: rule %q: id %d: %w", r.Name, id, err)
				}
			}
		}
		for _, id := range r.CgroupIDs {
			if err := e.objs.Cgroups.Put(&connectCgKey{Rule: ri, Id: id}, uint8(1)); err != nil {
				return fmt.Errorf("connect steering: rule %q: cgroup: %w", r.Name, err)
			}
		}
		for _, c := range r.Comms {
			k := connectCommKey{Rule: ri}
			for j := 0; j < len(c) && j < 15; j++ {
				k.Comm[j] = int8(c[j])
			}
			if err := e.objs.Comms.Put(&k, uint8(1)); err != nil {
				return fmt.Errorf("connect steering: rule %q: process: %w", r.Name, err)
			}
		}
	}
	return nil
}

func lpmKey(ri uint32, neg bool, p netip.Prefix) connectLpmKey {
	set := ri * 4
	if neg {
		set += 2
	}
	bits := p.Bits()
	if p.Addr().Is4() {
		bits += 96
	} else {
		set++
	}
	return connectLpmKey{Prefixlen: 32 + uint32(bits), Set: set, Addr: p.Masked().Addr().As16()}
}

// clear empties a generation's entries.
func (e *Engine) clear(gen uint32) {
	lo, hi := gen*MaxRules, gen*MaxRules+MaxRules
	var zero connectRule
	for ri := lo; ri < hi; ri++ {
		e.objs.RuleTable.Put(ri, &zero)
		var bm [8192]byte
		e.objs.Ports.Put(ri*2, &bm)
		e.objs.Ports.Put(ri*2+1, &bm)
	}
	for _, m := range []*ebpf.Map{e.objs.Dsts, e.objs.Ids, e.objs.Cgroups, e.objs.Comms} {
		var stale [][]byte
		it := m.Iterate()
		key := make([]byte, m.KeySize())
		val := make([]byte, m.ValueSize())
		for it.Next(&key, &val) {
			// Every key type starts with its rule index, but the LPM
			// key, whose set (rule * 4 + ...) follows its prefix length.
			ri := binary.NativeEndian.Uint32(key)
			if m == e.objs.Dsts {
				ri = binary.NativeEndian.Uint32(key[4:]) / 4
			}
			if ri >= lo && ri < hi {
				stale = append(stale, append([]byte(nil), key...))
			}
		}
		for _, k := range stale {
			m.Delete(k)
		}
	}
}

// SetUplinks publishes the uplinks' states and addresses (by index, as in
// the image), in the inactive generation, then switches.
func (e *Engine) SetUplinks(us []Uplink) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	next := 1 - e.ugen
	for i := 0; i < MaxUplinks; i++ {
		var ku connectUplink
		if i < len(us) {
			u := us[i]
			ku.Mark = u.Mark
			if u.Up4 && u.Addr4.Is4() {
				ku.Up4 = 1
				a := u.Addr4.As4()
				ku.Addr4 = binary.NativeEndian.Uint32(a[:])
			}
			if u.Up6 && u.Addr6.Is6() {
				ku.Up6 = 1
				a := u.Addr6.As16()
				for j := range ku.Addr6 {
					ku.Addr6[j] = binary.NativeEndian.Uint32(a[4*j:])
				}
			}
		}
		if err := e.objs.UplinkTable.Put(next*MaxUplinks+uint32(i), &ku); err != nil {
			return fmt.Errorf("connect steering: uplink %d: %w", i, err)
		}
	}
	if err := e.writeConf(e.gen, next, e.nrules); err != nil {
		return err
	}
	e.ugen = next
	return nil
}

// Stats are the program's counts, summed over CPUs.
type Stats struct{ Steered, Default, Refused, Stopped, BindFailed, NoMatch, Datagrams uint64 }

// Stats reads the counts.
func (e *Engine) Stats() (Stats, error) {
	var out [7]uint64
	for i := range out {
		var per []uint64
		if err := e.objs.Stats.Lookup(uint32(i), &per); err != nil {
			return Stats{}, fmt.Errorf("connect steering: stats: %w", err)
		}
		for _, v := range per {
			out[i] += v
		}
	}
	return Stats{out[0], out[1], out[2], out[3], out[4], out[5], out[6]}, nil
}

// Event is one line of the program's: a socket bound to an uplink, or a
// connect() refused.
type Event struct {
	Refused bool
	Rule    int // index in the image
	Uplink  int // index in the image
	UID     uint32
	PID     uint32
	Proto   ipproto.Proto // TCP or UDP
	Dst     netip.AddrPort
	Comm    string
}

// Events reads the program's events until the reader is closed (Close).
func (e *Engine) Events(fn func(Event)) error {
	r, err := ringbuf.NewReader(e.objs.Events)
	if err != nil {
		return fmt.Errorf("connect steering: events: %w", err)
	}
	e.mu.Lock()
	e.reader = r
	e.mu.Unlock()
	for {
		rec, err := r.Read()
		if err != nil {
			if errors.Is(err, os.ErrClosed) || errors.Is(err, ringbuf.ErrClosed) {
				return nil
			}
			return fmt.Errorf("connect steering: events: %w", err)
		}
		b := rec.RawSample
		if len(b) < 56 {
			continue
		}
		ne := binary.NativeEndian
		ev := Event{Refused: ne.Uint32(b[0:]) == 2, Rule: int(ne.Uint32(b[4:]) % MaxRules), Uplink: int(ne.Uint32(b[8:]) % MaxUplinks),
			UID: ne.Uint32(b[12:]), PID: ne.Uint32(b[16:]), Proto: ipproto.TCP}
		if b[21] == 2 {
			ev.Proto = ipproto.UDP
		}
		a := netip.AddrFrom16([16]byte(b[24:40])).Unmap()
		ev.Dst = netip.AddrPortFrom(a, ne.Uint16(b[22:]))
		comm := b[40:56]
		if n := indexByte(comm, 0); n >= 0 {
			comm = comm[:n]
		}
		ev.Comm = string(comm)
		fn(ev)
	}
}

func indexByte(b []byte, c byte) int {
	for i, x := range b {
		if x == c {
			return i
		}
	}
	return -1
}

// Detach removes the programs, their pins and maps: sockets connect as if
// rerouted had never run. SIGTERM's way out.
func (e *Engine) Detach() error {
	err := e.Close()
	if e.pinDir != "" {
		if rerr := os.RemoveAll(e.pinDir); rerr != nil && err == nil {
			err = rerr
		}
	}
	return err
}

// Close releases this process's handles. Pinned links stay attached (a
// restart's way out): the next run adopts them.
func (e *Engine) Close() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	var errs []error
	if e.reader != nil {
		errs = append(errs, e.reader.Close())
		e.reader = nil
	}
	for _, l := range e.links {
		if err := l.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	e.links = nil
	errs = append(errs, e.objs.Close())
	return errors.Join(errs...)
}

// DecidedBy names the rule that bound the socket with cookie, if the
// program (this run's, or an earlier one's it adopted) remembers it.
func (e *Engine) DecidedBy(cookie uint64) (string, bool) {
	var ri uint32
	if err := e.objs.Decided.Lookup(cookie, &ri); err != nil {
		return "", false
	}
	var name connectRuleName
	if err := e.objs.RuleNames.Lookup(ri, &name); err != nil || name.Name[0] == 0 {
		return "", false
	}
	b := make([]byte, 0, len(name.Name))
	for _, c := range name.Name {
		if c == 0 {
			break
		}
		b = append(b, byte(c))
	}
	return string(b), true
}
