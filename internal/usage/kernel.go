package usage

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/sockdiag"
)

// Kernel is the accounting programs (bpf/usage.c), attached at the cgroup
// v2 root, and their maps. Its methods are for one goroutine at a time.
type Kernel struct {
	objs   usageObjects
	links  []link.Link
	ring   *ringbuf.Reader // new sockets (Created)
	pinDir string          // "" when not pinned
	// Adopted: the maps and links of an earlier run were taken over, with
	// the counts of its live sockets.
	Adopted bool
	// Replaced: an earlier run's maps were of another layout (an upgrade
	// across a change of the program): they were removed, and the counts
	// of its live sockets with them.
	Replaced bool
}

// Socket is a counted socket: its owner as the kernel saw it at its
// creation.
type Socket struct {
	Cookie   uint64
	UID      uint32
	PID      uint32 // 0 for a socket from before the start
	CgroupID uint64
	comm     [16]int8
	Released bool // closed by its process; TCP may still send what it queued
}

// Entry is one socket's counts on one uplink (by index).
type Entry struct {
	Cookie uint64
	Uplink uint32
	Counts
}

// OpenKernel loads the programs and attaches them at cgroupRoot, for
// this network namespace's sockets only. With pinDir, the links and maps
// are pinned there, and a run that finds them adopts them: what sockets
// sent meanwhile was counted.
func OpenKernel(cgroupRoot, pinDir string) (*Kernel, error) {
	k := &Kernel{pinDir: pinDir}
	// Before Linux 5.11 maps are charged to RLIMIT_MEMLOCK (from 5.11,
	// to the cgroup's memory): lift it where it applies.
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("accounting: lift RLIMIT_MEMLOCK: %w", err)
	}
	if err := k.load(); err != nil {
		var ve *ebpf.VerifierError
		if errors.As(err, &ve) {
			return nil, fmt.Errorf("load the accounting program: %w", err)
		}
		if pinDir == "" || !errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("load the accounting program: %w", err)
		}
		// An earlier version's maps: start afresh.
		if err := os.RemoveAll(pinDir); err != nil {
			return nil, fmt.Errorf("remove an earlier version's accounting maps: %w", err)
		}
		k.Replaced = true
		if err := k.load(); err != nil {
			return nil, fmt.Errorf("load the accounting program: %w", err)
		}
	}
	var c usageConf
	if err := k.objs.Settings.Lookup(uint32(0), &c); err == nil && c.Netns != 0 {
		k.Adopted = true
	}
	for _, p := range []struct {
		prog *ebpf.Program
		typ  ebpf.AttachType
		name string
	}{{k.objs.SockCreate, ebpf.AttachCGroupInetSockCreate, "sock_create"}, {k.objs.SockRelease, ebpf.AttachCgroupInetSockRelease, "sock_release"},
		{k.objs.Egress, ebpf.AttachCGroupInetEgress, "egress"}, {k.objs.Ingress, ebpf.AttachCGroupInetIngress, "ingress"}} {
		pin := ""
		if pinDir != "" {
			pin = filepath.Join(pinDir, "link_"+p.name)
			if old, err := link.LoadPinnedLink(pin, nil); err == nil {
				if err := old.Update(p.prog); err != nil {
					old.Close()
					k.Close()
					return nil, fmt.Errorf("adopt %s: %w", pin, err)
				}
				k.links = append(k.links, old)
				continue
			}
		}
		l, err := link.AttachCgroup(link.CgroupOptions{Path: cgroupRoot, Attach: p.typ, Program: p.prog})
		if err != nil {
			k.Close()
			return nil, fmt.Errorf("attach the accounting program %s at %s: %w", p.name, cgroupRoot, err)
		}
		if pin != "" {
			if err := l.Pin(pin); err != nil {
				l.Close()
				k.Close()
				return nil, fmt.Errorf("pin %s: %w", pin, err)
			}
		}
		k.links = append(k.links, l)
	}
	if !k.Adopted {
		if err := k.learnNetns(); err != nil {
			k.Detach()
			return nil, err
		}
	}
	var err error
	if k.ring, err = ringbuf.NewReader(k.objs.Created); err != nil {
		k.Detach()
		return nil, fmt.Errorf("accounting: read new sockets: %w", err)
	}
	return k, nil
}

func (k *Kernel) load() error {
	spec, err := loadUsage()
	if err != nil {
		return err
	}
	opts := &ebpf.CollectionOptions{}
	if k.pinDir != "" {
		if err := os.MkdirAll(k.pinDir, 0o700); err != nil {
			return fmt.Errorf("bpf pin directory: %w", err)
		}
		for _, m := range spec.Maps {
			m.Pinning = ebpf.PinByName
		}
		opts.Maps.PinPath = k.pinDir
	}
	return spec.LoadAndAssign(&k.objs, opts)
}

// learnNetns tells the program this network namespace's cookie: it enters
// a socket of the daemon's own in `probe`, with its namespace's cookie.
// (SO_NETNS_COOKIE would say it directly, from Linux 5.14 on only.)
func (k *Kernel) learnNetns() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("accounting: a socket to learn the namespace by: %w", err)
	}
	defer unix.Close(fd)
	cookie, err := unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return fmt.Errorf("accounting: SO_COOKIE: %w", err)
	}
	var ns uint64
	if err := k.objs.Probe.Lookup(cookie, &ns); err != nil {
		return fmt.Errorf("accounting: the program did not see the daemon's own socket (cookie %d): %w", cookie, err)
	}
	if err := k.objs.Settings.Put(uint32(0), usageConf{Netns: ns}); err != nil {
		return fmt.Errorf("accounting: set the namespace: %w", err)
	}
	return nil
}

// EnterExisting enters the namespace's TCP and UDP sockets that exist
// already (those created before the program was attached, which it never
// saw created), and calls fn with each it entered.
func (k *Kernel) EnterExisting(diag sockdiag.Sockets, fn func(s *sockdiag.Socket)) error {
	for _, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		for _, proto := range []ipproto.Proto{ipproto.TCP, ipproto.UDP} {
			var perr error
			err := diag.Dump(fam, proto, func(s *sockdiag.Socket) {
				if s.Inode == 0 || s.Cookie == 0 { // TIME_WAIT: nothing to count
					return
				}
				si := usageSockInfo{Uid: s.UID, Cgroup: s.CgroupID}
				err := k.objs.Socks.Update(s.Cookie, &si, ebpf.UpdateNoExist)
				if err == nil {
					fn(s)
				} else if !errors.Is(err, ebpf.ErrKeyExist) && perr == nil {
					perr = fmt.Errorf("accounting: enter socket %d: %w", s.Cookie, err)
				}
			})
			if err := errors.Join(err, perr); err != nil {
				return err
			}
		}
	}
	return nil
}

// SetInterfaces replaces the counted interfaces: ifindex → uplink index.
func (k *Kernel) SetInterfaces(ifs map[uint32]uint32) error {
	var stale []uint32
	var key, val uint32
	it := k.objs.Ifaces.Iterate()
	for it.Next(&key, &val) {
		if want, ok := ifs[key]; !ok || want != val {
			stale = append(stale, key)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("accounting: read the counted interfaces: %w", err)
	}
	for _, key := range stale {
		if err := k.objs.Ifaces.Delete(key); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("accounting: interface %d: %w", key, err)
		}
	}
	for ifx, up := range ifs {
		if err := k.objs.Ifaces.Put(ifx, up); err != nil {
			return fmt.Errorf("accounting: interface %d: %w", ifx, err)
		}
	}
	return nil
}

// batch is how many entries one read of a map returns.
const batch = 4096

// Entries calls fn with each socket's counts on each uplink: a syscall per
// 4,096 entries (BPF_MAP_LOOKUP_BATCH, Linux 5.6), not two per entry.
func (k *Kernel) Entries(fn func(e Entry)) error {
	keys, vals := make([]usageAcctKey, batch), make([]usageCounts, batch)
	var cursor ebpf.MapBatchCursor
	for {
		n, err := k.objs.Acct.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			v := &vals[i]
			fn(Entry{Cookie: keys[i].Cookie, Uplink: keys[i].Uplink, Counts: Counts{BytesOut: v.BytesOut, PacketsOut: v.PacketsOut, BytesIn: v.BytesIn, PacketsIn: v.PacketsIn}})
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("accounting: read the counts: %w", err)
		}
	}
}

// Socket reads a socket's owner; false if it is not entered.
func (k *Kernel) Socket(cookie uint64) (Socket, bool) {
	var si usageSockInfo
	if err := k.objs.Socks.Lookup(cookie, &si); err != nil {
		return Socket{}, false
	}
	return socketOf(cookie, &si), true
}

func socketOf(cookie uint64, si *usageSockInfo) Socket {
	return Socket{Cookie: cookie, UID: si.Uid, PID: si.Pid, CgroupID: si.Cgroup, comm: si.Comm, Released: si.Flags&1 != 0}
}

// Comm is the command name of the process that created the socket.
func (s *Socket) Comm() string {
	n := 0
	for n < len(s.comm) && s.comm[n] != 0 {
		n++
	}
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(s.comm[i])
	}
	return string(b)
}

// Retire removes a socket that is gone: its counts on each uplink, and
// the socket itself.
func (k *Kernel) Retire(cookie uint64, uplinks []uint32) error {
	var errs []error
	for _, up := range uplinks {
		if err := k.objs.Acct.Delete(usageAcctKey{Cookie: cookie, Uplink: up}); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			errs = append(errs, err)
		}
	}
	if err := k.objs.Socks.Delete(cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("accounting: retire socket %d: %w", cookie, err)
	}
	return nil
}

// RetireAll removes the sockets that are gone, with their counts (by
// socket, the uplinks they have counts on): a syscall per 4,096 entries
// (BPF_MAP_DELETE_BATCH) where the kernel can, else one per entry.
func (k *Kernel) RetireAll(gone []uint64, uplinks map[uint64][]uint32) error {
	var acct []usageAcctKey
	for _, c := range gone {
		for _, up := range uplinks[c] {
			acct = append(acct, usageAcctKey{Cookie: c, Uplink: up})
		}
	}
	batched := func(m *ebpf.Map, keys any, n int) bool {
		if n == 0 {
			return true
		}
		done, err := m.BatchDelete(keys, nil)
		return err == nil && done == n
	}
	if batched(k.objs.Acct, acct, len(acct)) && batched(k.objs.Socks, gone, len(gone)) {
		return nil
	}
	for _, c := range gone { // what the batch left, one at a time
		if err := k.Retire(c, uplinks[c]); err != nil {
			return err
		}
	}
	return nil
}

// Sockets calls fn with every entered socket (reused between calls).
func (k *Kernel) Sockets(fn func(s *Socket)) error {
	keys, vals := make([]uint64, batch), make([]usageSockInfo, batch)
	var cursor ebpf.MapBatchCursor
	var s Socket
	for {
		n, err := k.objs.Socks.BatchLookup(&cursor, keys, vals, nil)
		for i := range n {
			s = socketOf(keys[i], &vals[i])
			fn(&s)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("accounting: read the sockets: %w", err)
		}
	}
}

// Lost returns, per uplink index, what was counted to no socket (a full
// map), and how many sockets could not be entered.
func (k *Kernel) Lost() (map[uint32]Counts, uint64, error) {
	out := map[uint32]Counts{}
	var key uint32
	var val usageCounts
	it := k.objs.Lost.Iterate()
	for it.Next(&key, &val) {
		if val != (usageCounts{}) {
			out[key] = Counts{BytesOut: val.BytesOut, PacketsOut: val.PacketsOut, BytesIn: val.BytesIn, PacketsIn: val.PacketsIn}
		}
	}
	if err := it.Err(); err != nil {
		return nil, 0, fmt.Errorf("accounting: read the lost counts: %w", err)
	}
	var full uint64
	if err := k.objs.SocksFull.Lookup(uint32(0), &full); err != nil {
		return nil, 0, fmt.Errorf("accounting: read the lost sockets: %w", err)
	}
	return out, full, nil
}

// Created calls fn with each new socket's cookie and process, as the
// kernel announced them, and then flush, every 50 ms, until Close.
func (k *Kernel) Created(fn func(cookie uint64, pid uint32), flush func()) error {
	var rec ringbuf.Record
	for {
		k.ring.SetDeadline(time.Now().Add(50 * time.Millisecond))
		for {
			err := k.ring.ReadInto(&rec)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				flush()
				break
			}
			if errors.Is(err, ringbuf.ErrClosed) {
				return nil
			}
			if err != nil {
				return fmt.Errorf("accounting: read new sockets: %w", err)
			}
			if len(rec.RawSample) >= 12 {
				fn(binary.NativeEndian.Uint64(rec.RawSample), binary.NativeEndian.Uint32(rec.RawSample[8:]))
			}
		}
	}
}

// Detach removes the programs, their pins and maps: SIGTERM's way out.
func (k *Kernel) Detach() error {
	err := k.Close()
	if k.pinDir != "" {
		if rerr := os.RemoveAll(k.pinDir); rerr != nil && err == nil {
			err = rerr
		}
	}
	return err
}

// Close releases this process's handles. Pinned links stay attached and
// count on (a restart's way out): the next run adopts them.
func (k *Kernel) Close() error {
	var errs []error
	if k.ring != nil {
		errs = append(errs, k.ring.Close())
		k.ring = nil
	}
	for _, l := range k.links {
		if err := l.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	k.links = nil
	errs = append(errs, k.objs.Close())
	return errors.Join(errs...)
}
