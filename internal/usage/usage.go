// Package usage accounts for what each owner sent and received through each
// uplink: bytes and packets, in and out, by user, cgroup, executable and the
// rule that decided.
//
// Counting is the kernel's (bpf/usage.c): cgroup_skb programs count every
// packet of every socket of the namespace on every counted interface, per
// socket and uplink, as the wire carries it (a GSO packet as its
// segments). That covers every engine alike, sockets the connect engine
// bound, flows the kernel maps translate, host-marked flows and traffic no
// rule concerns, since all of them are sockets' packets. The daemon reads
// the counts every interval, attributes each socket to its owner once, and
// retires the sockets that are gone, adding their counts to the totals of
// ended sockets, which a state file keeps across restarts (state.go).
//
// The programs and maps are pinned, so that a restart or a crash loses
// nothing: the next run adopts the live sockets' counts, and the state
// file says which retired sockets it had already added (Retiring), so that
// none is counted twice.
package usage

import (
	"fmt"
	"os"
	"os/user"
	"sort"
	"strconv"
	"sync"
	"time"
)

// Counts are a socket's, an owner's or an uplink's traffic.
type Counts struct {
	BytesIn    uint64 `json:"bytes_in"`
	BytesOut   uint64 `json:"bytes_out"`
	PacketsIn  uint64 `json:"packets_in"`
	PacketsOut uint64 `json:"packets_out"`
}

// Add adds o to c.
func (c *Counts) Add(o Counts) {
	c.BytesIn += o.BytesIn
	c.BytesOut += o.BytesOut
	c.PacketsIn += o.PacketsIn
	c.PacketsOut += o.PacketsOut
}

// Bytes is both directions' bytes.
func (c Counts) Bytes() uint64 { return c.BytesIn + c.BytesOut }

// Owner is who a socket's traffic is counted to.
type Owner struct {
	User   string `json:"user"`   // the name, or the uid where it has none
	Cgroup string `json:"cgroup"` // cgroup v2 path below the mount, "/" for the root; "" if unknown
	Exe    string `json:"exe"`    // the executable's path; its comm where the process had gone; "" if unknown
	Rule   string `json:"rule"`   // the rule that decided; NoRule if none did
}

// Kinds are the ways usage is broken down, as `rerouted usage --by` and
// the owner_kind label name them.
var Kinds = []string{"user", "cgroup", "exe", "rule"}

// Of is the owner's name of a kind ("" for unknown).
func (o Owner) Of(kind string) string {
	switch kind {
	case "user":
		return o.User
	case "cgroup":
		return o.Cgroup
	case "exe":
		return o.Exe
	case "rule":
		return o.Rule
	}
	return ""
}

// Row is one owner's counts on one uplink.
type Row struct {
	Uplink string `json:"uplink"`
	Owner
	Counts
}

// Report is all usage: what `rerouted usage --json` prints.
type Report struct {
	Since   time.Time `json:"since"`   // when counting began (the state file's first run)
	Uplinks []string  `json:"uplinks"` // each counted uplink, "default" first
	Rows    []Row     `json:"rows"`
	// What was counted to no socket (a full map) is in the uplinks'
	// totals, under the owner "other". SocketsNotCounted: sockets the
	// kernel could not enter at all (a full map): their traffic is not
	// counted.
	SocketsNotCounted uint64 `json:"sockets_not_counted,omitempty"`
	Error             string `json:"error,omitempty"`
}

// NoRule is the rule of a socket no rule decided (the host's routing).
const NoRule = "none"

// Default is the host's own routing, as rules name it.
const Default = "default"

type rowKey struct {
	uplink string
	Owner
}

type acctKey struct {
	cookie uint64
	uplink uint32
}

// Ledger is the daemon's account: the totals of ended sockets, and the
// kernel's counts of live ones. It is safe for concurrent use.
type Ledger struct {
	mu    sync.Mutex
	k     *Kernel
	state *State
	path  string
	// rules is the daemon's way to name the rule that decided a socket,
	// made once per harvest that needs it (ruleOf).
	rules  func() func(cookie uint64) string
	ruleOf func(cookie uint64) string
	cgroup func(id uint64) (string, bool)

	owners map[uint64]Owner     // each live socket's, once attributed
	prev   map[acctKey]Counts   // each entry as the last harvest read it
	idle   map[uint64]time.Time // released sockets: since when their counts have not changed
	// RetireAfter: a released socket whose counts have not changed for
	// this long is gone (a TCP socket sends what it queued after its
	// process closed it, and its FIN; its TIME_WAIT is no socket of its
	// own, and the kernel counts none of its packets).
	RetireAfter time.Duration
	users       map[uint32]string
	seenAt      map[uint64]time.Time // when each socket was first attributed
	// The live sockets' owners as last written (write), and when.
	liveOwners []Owner
	live       [][2]uint64
	liveAt     time.Time
	seeded     bool // owners holds an earlier run's, some of sockets gone since
	started    time.Time
	exes       map[uint64]string // new sockets' executables, read as they were created (WatchCreated)
	snap       Report            // as the last harvest made it
}

// NewLedger is the account of state (read from path) over k.
func NewLedger(k *Kernel, state *State, path string, rules func() func(cookie uint64) string, cgroup func(uint64) (string, bool)) *Ledger {
	l := &Ledger{started: time.Now(), k: k, state: state, path: path, rules: rules, cgroup: cgroup,
		owners: map[uint64]Owner{}, prev: map[acctKey]Counts{}, idle: map[uint64]time.Time{}, RetireAfter: 10 * time.Second, users: map[uint32]string{}, exes: map[uint64]string{}, seenAt: map[uint64]time.Time{}}
	if k.Adopted { // the live sockets are the earlier run's: their owners as it knew them
		for _, lv := range state.Live {
			if lv[1] < uint64(len(state.Owners)) {
				l.owners[lv[0]] = state.Owners[lv[1]]
				l.seeded = true
			}
		}
	}
	state.Owners, state.Live = nil, nil
	return l
}

// liveEvery: how old the live sockets' owners in the state file may be.
// Listing them is the bulk of the file on a host with many sockets, and
// the file is written at every harvest that retires one; after a crash,
// a socket younger than this is attributed afresh.
const liveEvery = time.Minute

// write writes the state file, with the live sockets' owners as of at
// most liveEvery ago (all as of now).
func (l *Ledger) write(all bool) error {
	if now := time.Now(); all || now.Sub(l.liveAt) >= liveEvery {
		idx := map[Owner]uint64{}
		l.liveOwners, l.live = l.liveOwners[:0], l.live[:0]
		for c, o := range l.owners {
			i, ok := idx[o]
			if !ok {
				i = uint64(len(l.liveOwners))
				idx[o] = i
				l.liveOwners = append(l.liveOwners, o)
			}
			l.live = append(l.live, [2]uint64{c, i})
		}
		l.liveAt = now
	}
	l.state.Owners, l.state.Live = l.liveOwners, l.live
	err := l.state.Write(l.path)
	l.state.Owners, l.state.Live = nil, nil
	return err
}

// Uplinks are the uplinks' indexes in the kernel's counts: names keep
// their index across runs (the state file has them), new ones are added.
func (l *Ledger) Uplinks(names []string) map[string]uint32 {
	l.mu.Lock()
	defer l.mu.Unlock()
	out := map[string]uint32{}
	for _, n := range append([]string{Default}, names...) {
		i := -1
		for j, m := range l.state.Uplinks {
			if m == n {
				i = j
			}
		}
		if i < 0 {
			l.state.Uplinks = append(l.state.Uplinks, n)
			i = len(l.state.Uplinks) - 1
		}
		out[n] = uint32(i)
	}
	return out
}

// Harvest reads the kernel's counts: attributes new sockets, retires those
// that are gone (their counts join the totals, and the state file is
// written before the kernel forgets them), and makes the report. final
// retires every socket (the daemon's removal: nothing will count them
// on).
func (l *Ledger) Harvest(final bool) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ruleOf = nil
	live := map[rowKey]Counts{}
	seen := map[acctKey]Counts{}
	changed := map[uint64]bool{}
	byCookie := map[uint64][]uint32{}
	if err := l.k.Entries(func(e Entry) {
		ak := acctKey{e.Cookie, e.Uplink}
		seen[ak] = e.Counts
		if l.prev[ak] != e.Counts {
			changed[e.Cookie] = true
		}
		byCookie[e.Cookie] = append(byCookie[e.Cookie], e.Uplink)
	}); err != nil {
		return err
	}
	// Which sockets are gone: released, and silent since.
	var gone []uint64
	now := time.Now()
	fresh := map[uint64]Socket{} // sockets not attributed yet, as the kernel entered them
	var present map[uint64]bool  // with owners seeded from an earlier run: which sockets are still there
	if l.seeded {
		present = map[uint64]bool{}
	}
	if err := l.k.Sockets(func(s *Socket) {
		cookie, released := s.Cookie, s.Released
		if present != nil {
			present[cookie] = true
		}
		if _, ok := l.owners[cookie]; !ok {
			fresh[cookie] = *s
		}
		if final {
			gone = append(gone, cookie)
			return
		}
		if !released {
			return
		}
		since, ok := l.idle[cookie]
		if changed[cookie] || !ok {
			l.idle[cookie] = now
			return
		}
		if now.Sub(since) >= l.RetireAfter {
			gone = append(gone, cookie)
		}
	}); err != nil {
		return err
	}
	if present != nil { // the earlier run's owners of sockets gone since
		for c := range l.owners {
			if !present[c] {
				delete(l.owners, c)
			}
		}
		l.seeded = false
	}
	goneSet := map[uint64]bool{}
	for _, c := range gone {
		goneSet[c] = true
	}
	for ak, c := range seen {
		rk := rowKey{l.uplinkName(ak.uplink), l.owner(ak.cookie, fresh, now)}
		if goneSet[ak.cookie] {
			l.state.add(rk, c)
			continue
		}
		v := live[rk]
		v.Add(c)
		live[rk] = v
	}
	if len(gone) > 0 {
		// Written before the kernel forgets them: a crash in between
		// leaves them in the kernel's maps, and the next run, told by
		// Retiring, retires them without counting them again.
		l.state.Retiring = gone
		if err := l.write(false); err != nil {
			return err
		}
		if err := l.k.RetireAll(gone, byCookie); err != nil {
			return err
		}
		for _, c := range gone {
			delete(l.owners, c)
			delete(l.seenAt, c)
			delete(l.exes, c)
			delete(l.idle, c)
			for _, up := range byCookie[c] {
				delete(seen, acctKey{c, up})
			}
		}
		l.state.Retiring = nil
	}
	l.prev = seen
	lost, full, err := l.k.Lost()
	if err != nil {
		return err
	}
	for up, c := range lost {
		rk := rowKey{uplink: l.uplinkName(up), Owner: Owner{User: "other", Cgroup: "other", Exe: "other", Rule: "other"}}
		v := live[rk]
		v.Add(c)
		live[rk] = v
	}
	l.snap = l.report(live)
	l.snap.SocketsNotCounted = full
	return nil
}

// SetInterfaces replaces the counted interfaces: ifindex → uplink index
// (Uplinks).
func (l *Ledger) SetInterfaces(ifs map[uint32]uint32) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.k.SetInterfaces(ifs)
}

// QuotaUsed is what the uplink carried (bytes in and out) since start, the
// beginning of its quota period, as of the last harvest. A period not seen
// before begins now, at the uplink's total (what it carried earlier in
// the period, before the quota was set or the daemon counted, is not
// known); the state file keeps it across restarts.
func (l *Ledger) QuotaUsed(uplink string, start time.Time) (uint64, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	var total uint64
	for _, r := range l.snap.Rows {
		if r.Uplink == uplink {
			total += r.Bytes()
		}
	}
	if l.state.Quotas == nil {
		l.state.Quotas = map[string]QuotaBase{}
	}
	q, ok := l.state.Quotas[uplink]
	if !ok || !q.Start.Equal(start) {
		q = QuotaBase{Start: start, Base: total}
		l.state.Quotas[uplink] = q
		if err := l.write(false); err != nil {
			return 0, err
		}
	}
	if total < q.Base {
		return 0, nil
	}
	return total - q.Base, nil
}

// Save writes the state file (the totals of ended sockets).
func (l *Ledger) Save() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.write(true)
}

// Report is the last harvest's.
func (l *Ledger) Report() Report {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.snap
}

func (l *Ledger) report(live map[rowKey]Counts) Report {
	all := map[rowKey]Counts{}
	for _, r := range l.state.Ended {
		c := all[rowKey{r.Uplink, r.Owner}]
		c.Add(r.Counts)
		all[rowKey{r.Uplink, r.Owner}] = c
	}
	for rk, c := range live {
		v := all[rk]
		v.Add(c)
		all[rk] = v
	}
	rep := Report{Since: l.state.Since, Uplinks: append([]string(nil), l.state.Uplinks...), Rows: []Row{}}
	for rk, c := range all {
		rep.Rows = append(rep.Rows, Row{Uplink: rk.uplink, Owner: rk.Owner, Counts: c})
	}
	sort.Slice(rep.Rows, func(i, j int) bool {
		a, b := rep.Rows[i], rep.Rows[j]
		if a.Uplink != b.Uplink {
			return a.Uplink < b.Uplink
		}
		if a.Bytes() != b.Bytes() {
			return a.Bytes() > b.Bytes()
		}
		return fmt.Sprint(a.Owner) < fmt.Sprint(b.Owner)
	})
	return rep
}

func (l *Ledger) uplinkName(i uint32) string {
	if int(i) < len(l.state.Uplinks) {
		return l.state.Uplinks[i]
	}
	return "uplink-" + strconv.Itoa(int(i))
}

// owner attributes a socket, once: the owner the kernel entered at its
// creation, the executable read while its process lives, the rule from
// the daemon.
func (l *Ledger) owner(cookie uint64, fresh map[uint64]Socket, now time.Time) Owner {
	if o, ok := l.owners[cookie]; ok {
		// The daemon may learn the rule of a young socket after its
		// first packets (a host-marked flow, learned from the kernel),
		// and that of a socket it adopted once steering runs again.
		if o.Rule == NoRule && (now.Sub(l.seenAt[cookie]) < l.RetireAfter || now.Sub(l.started) < startupGrace) {
			if o.Rule = l.rule(cookie); o.Rule != NoRule {
				l.owners[cookie] = o
			}
		}
		return o
	}
	l.seenAt[cookie] = now
	var o Owner
	s, ok := fresh[cookie]
	if !ok {
		s, ok = l.k.Socket(cookie)
	}
	if ok {
		o.User = l.userName(s.UID)
		if s.CgroupID != 0 && l.cgroup != nil {
			o.Cgroup, _ = l.cgroup(s.CgroupID)
		}
		o.Exe = l.exes[cookie]
		if o.Exe == "" && s.PID != 0 {
			if exe, err := os.Readlink("/proc/" + strconv.Itoa(int(s.PID)) + "/exe"); err == nil {
				o.Exe = exe
			}
		}
		if o.Exe == "" {
			o.Exe = s.Comm()
		}
	}
	o.Rule = l.rule(cookie)
	l.owners[cookie] = o
	return o
}

// startupGrace: how long after a start the rules of sockets no rule is
// known for are looked up again at each harvest (connect-time steering
// starts after the accounting: its verifier alone takes seconds).
const startupGrace = 30 * time.Second

// rule names the rule that decided the socket, as the daemon knows now.
func (l *Ledger) rule(cookie uint64) string {
	if l.ruleOf == nil && l.rules != nil {
		l.ruleOf = l.rules()
	}
	if l.ruleOf != nil {
		if r := l.ruleOf(cookie); r != "" {
			return r
		}
	}
	return NoRule
}

// Recover retires the sockets a crashed run had added to the totals but
// not yet retired (State.Retiring), without counting them again.
func (l *Ledger) Recover() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.state.Retiring) == 0 {
		return nil
	}
	ups := make([]uint32, len(l.state.Uplinks))
	for i := range ups {
		ups[i] = uint32(i)
	}
	for _, c := range l.state.Retiring {
		if err := l.k.Retire(c, ups); err != nil {
			return err
		}
	}
	l.state.Retiring = nil
	return l.write(true)
}

// WatchCreated reads the executable of each new socket's process as the
// kernel announces the socket, while the process most likely lives (a
// short-lived one is otherwise known by its comm only), until the kernel
// side closes.
func (l *Ledger) WatchCreated() error {
	type seen struct {
		exe string
		at  time.Time
	}
	pids := map[uint32]seen{} // a process opens many sockets: one readlink
	batch := map[uint64]string{}
	err := l.k.Created(func(cookie uint64, pid uint32) {
		now := time.Now()
		s, ok := pids[pid]
		if !ok || now.Sub(s.at) > 5*time.Second {
			exe, _ := os.Readlink("/proc/" + strconv.Itoa(int(pid)) + "/exe")
			s = seen{exe, now}
			pids[pid] = s
		}
		if s.exe != "" {
			batch[cookie] = s.exe
		}
		if len(batch) >= 256 {
			l.noteExes(batch)
		}
		if len(pids) > 4096 {
			clear(pids)
		}
	}, func() { l.noteExes(batch) })
	l.noteExes(batch)
	return err
}

func (l *Ledger) noteExes(b map[uint64]string) {
	if len(b) == 0 {
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	for c, e := range b {
		l.exes[c] = e
	}
	clear(b)
}

// NoteOwner attributes a socket the daemon knows more of than the kernel
// (one from before the start, found by its inode).
func (l *Ledger) NoteOwner(cookie uint64, uid uint32, cgroup, exe string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.owners[cookie] = Owner{User: l.userName(uid), Cgroup: cgroup, Exe: exe, Rule: NoRule}
	l.seenAt[cookie] = time.Now()
}

func (l *Ledger) userName(uid uint32) string {
	if n, ok := l.users[uid]; ok {
		return n
	}
	n := strconv.FormatUint(uint64(uid), 10)
	if u, err := user.LookupId(n); err == nil {
		n = u.Username
	}
	l.users[uid] = n
	return n
}
