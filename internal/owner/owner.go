// Package owner finds who owns a local socket, from /proc and the cgroup v2
// tree rather than from sock_diag: the process, by the socket's inode among
// its descriptors, and the cgroup's path, by its id. It also finds mount
// points in a mountinfo file, and whether a uid holds a raw socket.
package owner

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Process identifies the process that owns a socket. It is the one
// description of a process the policy, the packet path, the flow table and
// the debug stream share.
type Process struct {
	PID  int    // 0 if unknown
	Comm string // /proc/PID/comm (at most 15 bytes)
	Exe  string // /proc/PID/exe
}

// Owners finds the process and cgroup behind a socket. It is not safe for
// concurrent use; the daemon's packet goroutine owns one.
//
// A socket's process is found by its inode in /proc/PID/fd. The scan is
// narrowed to likely owners: processes that recently owned sockets of the
// same uid, then the processes in the socket's cgroup, then every process
// of that uid. Caches:
//   - inode → pid, checked against /proc/PID/fd before use;
//   - pid → comm and exe, kept while /proc/PID/stat shows the same start
//     time and comm (a new process with a reused pid, or an exec, changes
//     them);
//   - cgroup id → path; ids are never reused, so an entry is only ever
//     missing (a new cgroup), which a walk of the cgroup tree fills.
type Owners struct {
	proc       string // /proc
	CgroupRoot string // the cgroup v2 mount; "" when there is none

	inodePID map[uint32]int
	lastFD   map[int]int32 // pid → descriptor of the socket last found in it
	procs    map[int]procEntry
	recent   map[uint32][]int // uid → pids that recently owned sockets, newest first
	cgPaths  map[uint64]string
	lastWalk time.Time

	buf   []byte
	link  [64]byte
	dents [16 << 10]byte // getdents buffer
	fds   []int32        // a process's descriptors, as listed
}

type procEntry struct {
	start uint64
	comm  string
	exe   string
}

const (
	maxInodeCache = 4096
	maxProcCache  = 4096
	recentPerUID  = 8
	newestFDs     = 8 // descriptors looked at first in each recent owner
	minWalkGap    = 100 * time.Millisecond
)

// NewOwners finds the cgroup v2 mount (the unified hierarchy, also on
// hybrid hosts where it is mounted at /sys/fs/cgroup/unified).
func NewOwners() *Owners {
	o := &Owners{proc: "/proc", inodePID: map[uint32]int{}, lastFD: map[int]int32{}, procs: map[int]procEntry{},
		recent: map[uint32][]int{}, cgPaths: map[uint64]string{}, buf: make([]byte, 4096)}
	o.CgroupRoot, _ = Cgroup2Mount("/proc/self/mountinfo")
	return o
}

// Cgroup2Mount returns the mount point of the cgroup v2 hierarchy listed in
// a mountinfo file.
func Cgroup2Mount(mountinfo string) (string, error) { return FindMount(mountinfo, "cgroup2") }

// FindMount returns where the first file system of type fstype is mounted,
// as mountinfo (/proc/self/mountinfo) lists it.
func FindMount(mountinfo, fstype string) (string, error) {
	f, err := os.Open(mountinfo)
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPER
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		if fs := strings.Fields(post); len(fs) > 0 && fs[0] == fstype {
			if f := strings.Fields(pre); len(f) >= 5 {
				return unescapeMount(f[4]), nil
			}
		}
	}
	if err := sc.Err(); err != nil {
		return "", err
	}
	return "", &NoMountError{FSType: fstype}
}

// NoMountError is FindMount's error when mountinfo lists no file system of
// the type: the host has none mounted (an error reading mountinfo is
// another).
type NoMountError struct{ FSType string }

func (e *NoMountError) Error() string { return "no " + e.FSType + " mount" }

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Process finds the process that holds the socket with inode, owned by uid
// and created in cgroup id cg (0 if unknown).
func (o *Owners) Process(inode, uid uint32, cg uint64) (Process, bool) {
	if inode == 0 {
		return Process{}, false // TIME_WAIT or no socket: no file, no process
	}
	if pid, ok := o.inodePID[inode]; ok && o.holds(pid, inode, 0) {
		return o.describe(pid)
	}
	pid := o.find(inode, uid, cg)
	if pid == 0 {
		return Process{}, false
	}
	if len(o.inodePID) >= maxInodeCache {
		clear(o.inodePID)
	}
	o.inodePID[inode] = pid
	r := o.recent[uid]
	if len(r) == 0 || r[0] != pid {
		r = append([]int{pid}, removeInt(r, pid)...)
		o.recent[uid] = r[:min(len(r), recentPerUID)]
	}
	return o.describe(pid)
}

func (o *Owners) find(inode, uid uint32, cg uint64) int {
	// A new socket is nearly always its process's highest descriptor:
	// first look only there in every recent owner, so that one process
	// holding thousands of sockets does not cost a full scan for another's.
	for _, pid := range o.recent[uid] {
		if o.holds(pid, inode, newestFDs) {
			return pid
		}
	}
	tried := map[int]bool{}
	try := func(pid int) bool {
		if tried[pid] {
			return false
		}
		tried[pid] = true
		return o.holds(pid, inode, 0)
	}
	for _, pid := range o.recent[uid] {
		if try(pid) {
			return pid
		}
	}
	if cg != 0 {
		if path, ok := o.Cgroup(cg); ok {
			for _, pid := range o.cgroupPIDs(path) {
				if o.ownerUID(pid) == uid && try(pid) {
					return pid
				}
			}
		}
	}
	d, err := os.Open(o.proc)
	if err != nil {
		return 0
	}
	defer d.Close()
	for {
		names, err := d.Readdirnames(256)
		for _, n := range names {
			pid, perr := strconv.Atoi(n)
			if perr != nil || pid <= 0 {
				continue
			}
			if o.ownerUID(pid) == uid && try(pid) {
				return pid
			}
		}
		if err != nil {
			return 0
		}
	}
}

// ownerUID is the uid /proc shows as the process's owner (its effective
// uid), or MaxUint32 if the process is gone.
func (o *Owners) ownerUID(pid int) uint32 {
	var st syscall.Stat_t
	if err := syscall.Stat(o.proc+"/"+strconv.Itoa(pid), &st); err != nil {
		return ^uint32(0)
	}
	return st.Uid
}

// holds reports whether process pid has a file descriptor for the socket,
// among its limit highest descriptors (0: all).
//
// The kernel gives a new socket the lowest free descriptor, which in a
// process that holds many sockets is nearly always its highest: the
// descriptors are listed (one getdents pass, no allocation), then read from
// the highest down. A process with 10,000 sockets costs a few readlinks per
// new socket instead of thousands.
func (o *Owners) holds(pid int, inode uint32, limit int) bool {
	dir := o.proc + "/" + strconv.Itoa(pid) + "/fd"
	dfd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(dfd)
	want := "socket:[" + strconv.FormatUint(uint64(inode), 10) + "]"
	is := func(fd int32) bool {
		l, err := unix.Readlinkat(dfd, strconv.Itoa(int(fd)), o.link[:])
		if err != nil || string(o.link[:l]) != want {
			return false
		}
		if len(o.lastFD) >= maxProcCache {
			clear(o.lastFD)
		}
		o.lastFD[pid] = fd
		return true
	}
	// Listing a directory of thousands of descriptors is what costs (the
	// kernel makes a dentry for each): look around the descriptor where
	// this process's last socket was found first.
	if h, ok := o.lastFD[pid]; ok && limit > 0 {
		for d := int32(1); d <= int32(limit); d++ {
			if is(h+d) || (h-d+1 >= 0 && is(h-d+1)) {
				return true
			}
		}
		return false
	}
	o.fds = o.fds[:0]
	for {
		n, err := unix.Getdents(dfd, o.dents[:])
		if err != nil || n <= 0 {
			break
		}
		for b := o.dents[:n]; len(b) >= 19; {
			reclen := int(binary.NativeEndian.Uint16(b[16:18]))
			if reclen < 19 || reclen > len(b) {
				break
			}
			name := b[19:reclen]
			fd, ok := 0, len(name) > 0 && name[0] != 0
			for _, c := range name {
				if c == 0 {
					break
				}
				if c < '0' || c > '9' {
					ok = false
					break
				}
				fd = fd*10 + int(c-'0')
			}
			if ok {
				o.fds = append(o.fds, int32(fd))
			}
			b = b[reclen:]
		}
	}
	last := 0
	if limit > 0 {
		last = max(0, len(o.fds)-limit)
	}
	for i := len(o.fds) - 1; i >= last; i-- {
		if is(o.fds[i]) {
			return true
		}
	}
	return false
}

// describe returns pid's comm and exe, from the cache while the process is
// the same one.
func (o *Owners) describe(pid int) (Process, bool) {
	start, comm, err := o.stat(pid)
	if err != nil {
		return Process{}, false
	}
	if e, ok := o.procs[pid]; ok && e.start == start && e.comm == comm {
		return Process{PID: pid, Comm: comm, Exe: e.exe}, true
	}
	exe, _ := os.Readlink(o.proc + "/" + strconv.Itoa(pid) + "/exe")
	if len(o.procs) >= maxProcCache {
		clear(o.procs)
	}
	o.procs[pid] = procEntry{start: start, comm: comm, exe: exe}
	return Process{PID: pid, Comm: comm, Exe: exe}, true
}

// ProcessByPID describes a process by its pid.
func (o *Owners) ProcessByPID(pid int) (Process, bool) { return o.describe(pid) }

// stat reads the start time and comm from /proc/PID/stat.
func (o *Owners) stat(pid int) (uint64, string, error) {
	f, err := os.Open(o.proc + "/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, "", err
	}
	n, err := f.Read(o.buf)
	f.Close()
	if err != nil {
		return 0, "", err
	}
	b := o.buf[:n]
	// pid (comm) state ppid ... : comm may contain spaces and parentheses.
	l, r := bytes.IndexByte(b, '('), bytes.LastIndexByte(b, ')')
	if l < 0 || r < l {
		return 0, "", fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	fields := bytes.Fields(b[r+1:])
	const startField = 22 - 3 // field 22 of stat, counted from field 3 (state)
	if len(fields) <= startField {
		return 0, "", fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	start, err := strconv.ParseUint(string(fields[startField]), 10, 64)
	return start, string(b[l+1 : r]), err
}

// Cgroup returns the path, relative to the cgroup v2 mount, of cgroup id.
func (o *Owners) Cgroup(id uint64) (string, bool) {
	if o.CgroupRoot == "" || id == 0 {
		return "", false
	}
	if p, ok := o.cgPaths[id]; ok {
		return p, true
	}
	if time.Since(o.lastWalk) < minWalkGap {
		return "", false
	}
	o.walk()
	p, ok := o.cgPaths[id]
	return p, ok
}

// walk indexes every cgroup directory by its inode number, which is the
// cgroup id on 64-bit kernels.
func (o *Owners) walk() {
	o.lastWalk = time.Now()
	filepath.WalkDir(o.CgroupRoot, func(path string, d fs.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			return nil
		}
		if st, ok := info.Sys().(*syscall.Stat_t); ok {
			rel, _ := filepath.Rel(o.CgroupRoot, path)
			if rel == "." {
				rel = ""
			}
			o.cgPaths[st.Ino] = rel
		}
		return nil
	})
}

func (o *Owners) cgroupPIDs(rel string) []int {
	b, err := os.ReadFile(filepath.Join(o.CgroupRoot, rel, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var pids []int
	for _, l := range bytes.Fields(b) {
		if pid, err := strconv.Atoi(string(l)); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// CgroupOfPID returns a process's cgroup v2 path, relative to the mount.
func CgroupOfPID(pid int) (string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "0::"); ok {
			return strings.Trim(rest, "/"), nil
		}
	}
	return "", fmt.Errorf("process %d has no cgroup v2 path", pid)
}

func removeInt(xs []int, v int) []int {
	out := xs[:0:0]
	for _, x := range xs {
		if x != v {
			out = append(out, x)
		}
	}
	return out
}

// HasRawSocket is HasRawSocket in the network namespace of the /proc the
// Owners reads.
func (o *Owners) HasRawSocket(v6 bool, uid uint32) (bool, error) {
	return HasRawSocket(o.proc+"/net", v6, uid)
}

// HasRawSocket reports whether uid owns a raw socket (IPv6 with v6) that
// can send TCP segments: protocol IPPROTO_TCP, or IPPROTO_RAW with its own
// IP headers. That is what sends a SYN no TCP socket owns (traceroute -T,
// SYN scanners, hping3). It reads procNet/raw or raw6 (/proc/net: the
// caller's network namespace), which every kernel has; sock_diag's raw
// sockets need a module many do not load.
func HasRawSocket(procNet string, v6 bool, uid uint32) (bool, error) {
	name := "raw"
	if v6 {
		name = "raw6"
	}
	b, err := os.ReadFile(filepath.Join(procNet, name))
	if err != nil {
		return false, err
	}
	lines := strings.Split(string(b), "\n")
	for _, l := range lines[min(1, len(lines)):] {
		// sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid ...
		f := strings.Fields(l)
		if len(f) < 8 {
			continue
		}
		_, port, ok := strings.Cut(f[1], ":")
		if !ok || (port != "0006" && port != "00FF") {
			continue
		}
		if u, err := strconv.ParseUint(f[7], 10, 32); err == nil && uint32(u) == uid {
			return true, nil
		}
	}
	return false, nil
}
