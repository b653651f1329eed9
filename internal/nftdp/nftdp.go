// Package nftdp programs rerouted's kernel datapath: one nftables table of
// its own, in which per-flow map elements translate every packet of a
// translated flow in both directions, and queue rules hand the first packet
// of each new flow to the daemon.
//
// The table's sets, maps and chains are described once, in docs/design.md's
// "The table" (TestNftListClean and the golden batches in testdata hold
// the code to what nft prints and what is sent). In short: for each
// protocol P and family F, maps P_outF, P_sportF and P_markF give a socket
// tuple its wire source address, port and mark; P_inF and P_dportF give a
// reply its socket's address and port back; P_passF holds UDP and echo
// tuples decided untranslated. With the userspace datapath the maps are
// key-only sets, P_uoutF and P_uinF, whose rules queue every packet of a
// translated flow to the daemon, which rewrites it.
//
// Each translation rule looks every field up first, each from its own map
// into registers of its own, then writes the fields from those registers; so
// no write can change what a later lookup sees. (One lookup of a
// concatenation would do, but nft prints a write only from a register a
// lookup of its own filled, and `nft list ruleset` printed errors.) nft's
// payload writes fix the IP and transport checksums, offloaded ones
// included.
//
// Hooks: outbound translation runs after the host's own mark rules (mangle)
// and after conntrack, inbound before conntrack (raw): conntrack sees only the
// socket's own tuple in both directions, so a stateful firewall keeps working
// and no conntrack entry is needed at all.
package nftdp

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/nftdp/nftbatch"
	"github.com/rerouted/rerouted/internal/nftdp/nftfeat"
	"github.com/rerouted/rerouted/internal/nftdp/prefilter"
	"github.com/rerouted/rerouted/internal/nlmsg"
	"golang.org/x/sys/unix"
)

// TableName is the name of rerouted's inet table. Nothing else is touched.
const TableName = "rerouted"

// FlowMapSize bounds each flow map: past it, a new flow's elements are
// refused (the daemon's, counted as install errors) or not added (the
// kernel's decisions, which then go to the daemon).
const FlowMapSize = 1 << 20

// seenSetSize bounds each family's set of UDP tuples peers opened.
const seenSetSize = 65536

// What one remote source (an IPv4 address, an IPv6 /64) may add to the
// learned UDP tuples: a flood of new tuples from one source must not
// crowd out everyone else's. A source over its budget is not learned;
// its answers go through the daemon, which still sends them from the
// address asked (policy.DecideService), only slower.
const (
	learnRate  = 256  // new tuples per second
	learnBurst = 1024 // at once
	meterFor   = 10 * time.Second
	meterSize  = 65536
)

// StaleMark flags, for an instant, a translated packet whose new source
// is no longer one of the host's addresses: the output chain drops it
// (and counts it) instead of letting it leave. Nothing else uses it.
const StaleMark = 0x72720001

// ProbePriority is the socket priority (SO_PRIORITY) of the daemon's own
// health probes: the output chain lets such packets through first, so that
// they are never queued or translated. (Its low bits put them in the
// default qdisc's best-effort band.)
const ProbePriority = 0x72720000

// Priorities of the base chains.
const (
	OutputPriority     = -150 + 10 // NF_IP_PRI_MANGLE + 10: after the host's mark rules
	PreroutingPriority = -300      // NF_IP_PRI_RAW: before conntrack and routing
)

// Entry is the kernel state of one flow: a translation, or for UDP and ICMP
// echo a decision not to translate (Pass), cached so that later packets
// need no daemon.
type Entry struct {
	Proto    ipproto.Proto  // TCP, UDP, ICMP (echo) or ICMPv6 (echo)
	Src, Dst netip.AddrPort // the socket's own tuple; an echo's identifier as ports
	NewSrc   netip.AddrPort // what the wire sees instead of Src
	Mark     uint32         // fwmark put on every outbound packet
	Pass     bool           // not translated: NewSrc and Mark are unused
}

// Datapath is the installed table. Its per-flow socket is used under mu,
// one transaction at a time; its general one under listMu. A listing can
// take seconds (the kernel dumps 100,000 elements in ~3 s), and must not
// hold up new flows' transactions meanwhile.
type Datapath struct {
	mu sync.Mutex // batches
	// transactions counts the per-flow transactions committed: each one
	// is a new generation of the host's ruleset.
	transactions atomic.Uint64
	listMu       sync.Mutex     // conn
	conn         *nftables.Conn // setup, listing, removal
	batches      *nftbatch.Conn // hand-built batches: per-flow transactions (elements.go), translation rules, maps of marks
	table        *nftables.Table
	fams         [2]family // IPv4, IPv6
	userspace    bool
	seenFor      time.Duration // lifetime of a learned UDP tuple after its last inbound packet
	connPort     uint32        // conn's netlink port
	first        uint16        // the queues, first..first+total-1
	total        uint16
	// The prefilter (prefilter.go): the policy it holds, its generation,
	// its sets, and how many rules each chain has with it.
	filter      prefilter.Filter
	gen         int
	filterSets  []*nftables.Set
	filterRules []nftbatch.Rule // the prefilter's rules, on its sets
	ruleCount   map[string]int
	// offeredBefore is what the queue rules this generation replaced had
	// counted (under listMu).
	offeredBefore uint64
	// QueueMethod says how packets reach the queue: nftfeat.QueueNative or,
	// on kernels without nft_queue, nftfeat.QueueXT through nft_compat.
	QueueMethod string
	// Replaced is true when a table left by an earlier run was removed,
	// Adopted when it was kept with its flows' elements.
	Replaced, Adopted bool
	// steered: the addresses and marks of the uplinks sockets are bound
	// to at connect() (under mu).
	steered []Steered
	// DefragErr is why the kernel could not be asked to reassemble
	// fragments (nil: it does; see defragRule).
	DefragErr error
	// hostMarks: the uplinks whose host-marked flows the kernel decides
	// (under mu; hostmark.go). HostMarkErr says why the kernel cannot
	// (nil: it can): then the queue decides them.
	hostMarks   []HostMark
	HostMarkErr error
}

// family is one address family's part of the table.
type family struct {
	nfproto      byte
	addrLen      int    // bytes
	saddr, daddr uint32 // offsets in the network header
	protos       [3]proto
}

// proto is one transport protocol's part of a family's table.
type proto struct {
	num          ipproto.Proto // IP protocol number
	name         string        // in set names: "tcp", "udp", "icmp"
	sport, dport uint32        // offsets of the ports; an echo's identifier is both
	csum         uint32        // offset of the transport checksum
	echo         [2]byte       // ICMP: the echo request and reply types
	out, in      *nftables.Set // kernel datapath: tuple -> source, destination address; userspace: the keys
	outPort      *nftables.Set // kernel datapath: socket tuple -> new source port (not for echo)
	outMark      *nftables.Set // kernel datapath: socket tuple -> mark
	inPort       *nftables.Set // kernel datapath: reply tuple -> the socket's port (not for echo)
	pass         *nftables.Set // UDP and ICMP: tuples decided untranslated
	wire         *nftables.Set // kernel datapath: mark . port . destination of every translation (the kernel's decisions check it)
	seen         *nftables.Set // UDP: tuples a peer opened (a local server's), learned in the kernel
	meter        *nftables.Set // UDP: each remote source's budget of new learned tuples
}

func (p *proto) isEcho() bool { return p.num.IsICMP() }

// counted reports whether the protocol's elements count packets: those
// whose flows can end by idleness.
func (p *proto) counted() bool { return p.num != ipproto.TCP }

// flowSets are the sets or maps that hold the protocol's flows, in the
// order a transaction writes them: outbound (source address, port, mark),
// inbound (address, port), then the untranslated ones; nil where the
// protocol or datapath has none.
func (p *proto) flowSets() [7]*nftables.Set {
	return [7]*nftables.Set{p.out, p.outPort, p.outMark, p.in, p.inPort, p.pass, p.wire}
}

func (d *Datapath) family(a netip.Addr) *family {
	if a.Is4() {
		return &d.fams[0]
	}
	return &d.fams[1]
}

// proto returns the part of the table for an entry, or nil for a protocol
// rerouted does not handle.
func (d *Datapath) proto(e *Entry) *proto {
	f := d.family(e.Src.Addr())
	for i := range f.protos {
		if f.protos[i].num == e.Proto {
			return &f.protos[i]
		}
	}
	return nil
}

// StaleDrops is how many translated packets were dropped because their new
// source was no longer the host's (the kernel datapath's guard rule).
func (d *Datapath) StaleDrops() (uint64, error) {
	d.listMu.Lock()
	defer d.listMu.Unlock()
	rules, err := d.conn.GetRules(d.table, &nftables.Chain{Name: "output", Table: d.table})
	if err != nil {
		return 0, fmt.Errorf("list rules of chain output: %w", err)
	}
	for _, r := range rules {
		var flagged bool
		for _, e := range r.Exprs {
			switch e := e.(type) {
			case *expr.Cmp:
				flagged = flagged || binaryutil.NativeEndian.Uint32(append(e.Data, 0, 0, 0, 0)[:4]) == StaleMark
			case *expr.Counter:
				if flagged {
					return e.Packets, nil
				}
			}
		}
	}
	return 0, nil
}

// Install creates rerouted's table in the caller's network namespace.
// Packets are queued to queues first .. first+total-1. With userspace,
// every packet of a translated flow is queued instead of rewritten in the
// kernel.
//
// A table an earlier run left (a crash, or a stop for a restart) is adopted
// when it is the kernel datapath's and has every set this version uses: its
// rules are replaced in one transaction, its elements stay, and Adopted is
// set; the caller takes the flows over (Entries). Any other table is
// replaced (Replaced).
//
// seen is how long a UDP tuple a peer opened stays known after its last
// inbound packet (0: two minutes); see flowRules.
func Install(first, total uint16, userspace bool, seen time.Duration, filter prefilter.Filter) (*Datapath, error) {
	if seen <= 0 {
		seen = 2 * time.Minute
	}
	// The general socket's port, so that the monitor knows this
	// datapath's own changes (building, repairing, the prefilter's sets).
	var connPort uint32
	conn, err := nftables.New(nftables.AsLasting(), nftables.WithSockOptions(func(c *netlink.Conn) error {
		connPort = c.PID()
		// A transaction of thousands of sets (a large policy's
		// prefilter) is acknowledged message by message.
		return nlmsg.ForceReadBuffer(c, 16<<20)
	}))
	if err != nil {
		return nil, fmt.Errorf("nftables netlink: %w", err)
	}
	d := &Datapath{conn: conn, table: &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}, userspace: userspace, seenFor: seen,
		first: first, total: total, filter: filter, connPort: connPort}
	d.defineFamilies()
	if err := d.defineSets(); err != nil {
		conn.CloseLasting()
		return nil, err
	}
	if d.batches, err = nftbatch.Dial(TableName); err != nil {
		conn.CloseLasting()
		return nil, err
	}
	if t, err := conn.ListTableOfFamily(TableName, nftables.TableFamilyINet); err == nil && t != nil {
		d.Adopted = !userspace && d.hasOurSets()
		if d.Adopted {
			err = d.install(first, total)
		}
		if !d.Adopted || err != nil {
			d.Adopted = false
			conn.DelTable(d.table)
			if err := conn.Flush(); err != nil {
				d.closeSockets()
				return nil, fmt.Errorf("remove stale table inet %s: %w", TableName, err)
			}
			d.Replaced = true
		}
	}
	if !d.Adopted {
		if err := d.install(first, total); err != nil {
			d.Remove()
			return nil, fmt.Errorf("install table inet %s: %w", TableName, err)
		}
	}
	return d, nil
}

// install creates the table, sets and chains (or finds them), then sets
// every rule in one transaction that first empties both chains: adopting a
// table swaps its rules atomically and keeps its elements. Kernels built
// without CONFIG_NFT_QUEUE reject the native queue statement; the xtables
// target through nft_compat does the same job.
func (d *Datapath) install(first, total uint16) error {
	if err := d.build(); err != nil {
		return nftfeat.Diagnose(err)
	}
	// Generations start at a number of this run's own: an adopted table
	// may hold an earlier run's prefilter sets.
	d.gen = int(time.Now().UnixNano()/1e3%1e6) * 100
	// Appended after the chain's rules, where it cannot change anything
	// before the transaction below replaces them all.
	if d.DefragErr = d.batches.AddRules([]nftbatch.Rule{defragRule()}, nil); d.DefragErr != nil {
		d.DefragErr = fmt.Errorf("%w (is the nft_tproxy module available?)", d.DefragErr)
	}
	d.QueueMethod = nftfeat.QueueNative
	errNative := d.applyFilter()
	if errNative != nil {
		d.QueueMethod = nftfeat.QueueXT
		if err := d.applyFilter(); err != nil {
			// Most likely a module is missing: the probe names it.
			return nftfeat.Diagnose(fmt.Errorf("rules with nft queue: %v; with xt NFQUEUE: %w", errNative, err))
		}
	}
	d.probeHostMarks()
	d.dropStaleFilterSets()
	return nil
}

// dropStaleFilterSets removes prefilter sets an earlier run left in an
// adopted table.
func (d *Datapath) dropStaleFilterSets() {
	d.listMu.Lock()
	sets, err := d.conn.GetSets(d.table)
	d.listMu.Unlock()
	if err != nil {
		return
	}
	ours := map[string]bool{}
	for _, s := range d.filterSets {
		ours[s.Name] = true
	}
	var stale []*nftables.Set
	for _, s := range sets {
		if strings.HasPrefix(s.Name, "f") && strings.Contains(s.Name, "_r") && !ours[s.Name] {
			stale = append(stale, s)
		}
	}
	d.dropSets(stale)
}

// Repair puts back what others removed from the table: the table, its sets
// and its chains are created where missing (what is left keeps its
// elements), and every rule is set again in one transaction that first
// empties both chains, which also drops rules others added. Elements of the
// sets others deleted are the caller's to add again.
func (d *Datapath) Repair() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.build(); err != nil {
		return fmt.Errorf("repair table inet %s: %w", TableName, err)
	}
	if err := d.applyFilter(); err != nil {
		return fmt.Errorf("repair table inet %s: %w", TableName, err)
	}
	return nil
}

// Missing lists what of the table is not as this daemon installed it: the
// table, a set, a chain, or a chain whose rule count differs. It reads no
// elements; it is how the daemon checks its table when notifications were
// lost.
func (d *Datapath) Missing() ([]string, error) {
	// What this datapath installed last, read first: mu before listMu,
	// the order every other path takes them in.
	d.mu.Lock()
	want := d.ruleCount
	filterSets := d.filterSets
	d.mu.Unlock()
	d.listMu.Lock()
	defer d.listMu.Unlock()
	t, err := d.conn.ListTableOfFamily(TableName, nftables.TableFamilyINet)
	if err != nil || t == nil {
		if errors.Is(err, unix.ENOENT) || t == nil {
			return []string{"table"}, nil
		}
		return nil, fmt.Errorf("list table inet %s: %w", TableName, err)
	}
	var missing []string
	sets, err := d.conn.GetSets(d.table)
	if err != nil {
		return nil, fmt.Errorf("list sets: %w", err)
	}
	have := map[string]bool{}
	for _, s := range sets {
		have[s.Name] = true
	}
	for _, n := range d.Sets() {
		if !have[n] {
			missing = append(missing, "set "+n)
		}
	}
	for _, s := range filterSets {
		if !have[s.Name] {
			missing = append(missing, "set "+s.Name)
		}
	}
	for _, chain := range []string{"output", "prerouting", prefilter.FilterSYN, prefilter.FilterNew, prefilter.EnqueueSYN, prefilter.EnqueueNew} {
		rules, err := d.conn.GetRules(d.table, &nftables.Chain{Name: chain, Table: d.table})
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				missing = append(missing, "chain "+chain)
				continue
			}
			return nil, fmt.Errorf("list rules of chain %s: %w", chain, err)
		}
		if len(rules) != want[chain] {
			missing = append(missing, fmt.Sprintf("rules of chain %s (%d of %d)", chain, len(rules), want[chain]))
		}
	}
	return missing, nil
}

// hasOurSets reports whether the existing table has every set this version
// would create.
func (d *Datapath) hasOurSets() bool {
	sets, err := d.conn.GetSets(d.table)
	if err != nil {
		return false
	}
	have := map[string]uint32{} // name: size
	for _, s := range sets {
		have[s.Name] = s.Size
	}
	// Only the sets that hold flows: the others (learned tuples, meters)
	// are created where missing and may start empty.
	for i := range d.fams {
		for j := range d.fams[i].protos {
			p := &d.fams[i].protos[j]
			for _, s := range p.flowSets() {
				if s != nil && have[s.Name] != s.Size {
					return false // missing, or of an earlier version's size
				}
			}
		}
	}
	return true
}

// Remove deletes the table and everything in it, and closes the sockets.
func (d *Datapath) Remove() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.listMu.Lock()
	defer d.listMu.Unlock()
	d.conn.DelTable(d.table)
	err := d.conn.Flush()
	if cerr := d.closeSockets(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("remove table inet %s: %w", TableName, err)
	}
	return nil
}

// Close closes the sockets and leaves the table in place, so that existing
// flows keep working while no daemon runs.
func (d *Datapath) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.listMu.Lock()
	defer d.listMu.Unlock()
	return d.closeSockets()
}

func (d *Datapath) closeSockets() error {
	return errors.Join(d.conn.CloseLasting(), d.batches.Close())
}

// defineFamilies describes the two families and their protocols.
func (d *Datapath) defineFamilies() {
	for i, icmp := range []proto{
		{num: ipproto.ICMP, name: "icmp", sport: 4, dport: 4, csum: 2, echo: [2]byte{8, 0}},
		{num: ipproto.ICMPv6, name: "icmp", sport: 4, dport: 4, csum: 2, echo: [2]byte{128, 129}},
	} {
		d.fams[i].protos = [3]proto{
			{num: ipproto.TCP, name: "tcp", sport: 0, dport: 2, csum: 16},
			{num: ipproto.UDP, name: "udp", sport: 0, dport: 2, csum: 6},
			icmp,
		}
	}
	d.fams[0].nfproto, d.fams[0].addrLen, d.fams[0].saddr, d.fams[0].daddr = unix.NFPROTO_IPV4, 4, 12, 16
	d.fams[1].nfproto, d.fams[1].addrLen, d.fams[1].saddr, d.fams[1].daddr = unix.NFPROTO_IPV6, 16, 8, 24
}

func (d *Datapath) defineSets() error {
	t := d.table
	for i, addrType := range []nftables.SetDatatype{nftables.TypeIPAddr, nftables.TypeIP6Addr} {
		f, v := &d.fams[i], fmt.Sprint(4+2*i) // "4", "6"
		keyType, err := nftables.ConcatSetType(addrType, nftables.TypeInetService, addrType, nftables.TypeInetService)
		if err != nil {
			return err
		}
		for j := range f.protos {
			p := &f.protos[j]
			n := p.name + "_"
			if d.userspace {
				p.out = &nftables.Set{Table: t, Name: n + "uout" + v, Concatenation: true, KeyType: keyType,
					Comment: "socket tuples of translated flows: every packet to the daemon"}
				p.in = &nftables.Set{Table: t, Name: n + "uin" + v, Concatenation: true, KeyType: keyType,
					Comment: "translated tuples (reply view): every packet to the daemon"}
			} else {
				// One map per field written: nft lists a write only
				// from a lookup of its own (see flowRules).
				p.out = &nftables.Set{Table: t, Name: n + "out" + v, IsMap: true, Concatenation: true, KeyType: keyType, DataType: addrType,
					Comment: "socket tuple : translated source address"}
				p.outMark = &nftables.Set{Table: t, Name: n + "mark" + v, IsMap: true, Concatenation: true, KeyType: keyType, DataType: nftables.TypeMark,
					Comment: "socket tuple : mark"}
				p.in = &nftables.Set{Table: t, Name: n + "in" + v, IsMap: true, Concatenation: true, KeyType: keyType, DataType: addrType,
					Comment: "translated tuple (reply view) : socket address"}
				wireKey, err := nftables.ConcatSetType(nftables.TypeMark, nftables.TypeInetService, addrType, nftables.TypeInetService)
				if err != nil {
					return err
				}
				p.wire = &nftables.Set{Table: t, Name: n + "wire" + v, Concatenation: true, KeyType: wireKey,
					Comment: "uplink mark . wire port . destination of each translation: a kernel decision's is free"}
				if !p.isEcho() {
					p.outPort = &nftables.Set{Table: t, Name: n + "sport" + v, IsMap: true, Concatenation: true, KeyType: keyType, DataType: nftables.TypeInetService,
						Comment: "socket tuple : translated source port"}
					p.inPort = &nftables.Set{Table: t, Name: n + "dport" + v, IsMap: true, Concatenation: true, KeyType: keyType, DataType: nftables.TypeInetService,
						Comment: "translated tuple (reply view) : socket port"}
				}
			}
			if p.counted() {
				p.pass = &nftables.Set{Table: t, Name: n + "pass" + v, Concatenation: true, KeyType: keyType,
					Comment: "socket tuples decided untranslated"}
			}
			if p.num == ipproto.UDP {
				// Bounded: a peer spraying source ports fills it, and then
				// replies are decided by the daemon as before.
				p.seen = &nftables.Set{Table: t, Name: n + "seen" + v, Concatenation: true, KeyType: keyType,
					Dynamic: true, HasTimeout: true, Timeout: d.seenFor, Size: seenSetSize,
					Comment: "local tuples a peer opened: replies pass untranslated"}
			}
			if p.num == ipproto.UDP {
				key := nftables.TypeIPAddr
				if i == 1 {
					key = nftables.TypeIP6Addr
					key.Bytes = 8 // the source's /64
				}
				p.meter = &nftables.Set{Table: t, Name: n + "meter" + v, KeyType: key,
					Dynamic: true, HasTimeout: true, Timeout: meterFor, Size: meterSize,
					Comment: "each remote source's budget of new learned tuples"}
			}
			for _, s := range []*nftables.Set{p.out, p.in, p.pass} {
				if s != nil {
					s.Counter = p.counted() // idleness is read from the counters
				}
			}
			// The kernel's own decisions add elements from the packet
			// path, which bounds a map without a size at 65,535.
			for _, s := range p.flowSets() {
				if s != nil && !d.userspace {
					s.Size, s.Dynamic = FlowMapSize, true
				}
			}
		}
	}
	return nil
}

// build creates the table, its sets or maps and its chains, or finds them
// as they are: an existing table keeps its elements.
func (d *Datapath) build() error {
	d.listMu.Lock()
	defer d.listMu.Unlock()
	c, t := d.conn, d.table
	c.AddTable(t)
	for i := range d.fams {
		for j := range d.fams[i].protos {
			p := &d.fams[i].protos[j]
			fs := p.flowSets()
			for _, s := range append(fs[:], p.seen, p.meter) {
				if s == nil || s == p.outMark {
					continue // the marks' maps: below
				}
				if err := c.AddSet(s, nil); err != nil {
					return fmt.Errorf("add set %s: %w", s.Name, err)
				}
			}
		}
	}
	policy := nftables.ChainPolicyAccept
	c.AddChain(&nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeRoute,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityRef(OutputPriority), Policy: &policy})
	c.AddChain(&nftables.Chain{Name: "prerouting", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(PreroutingPriority), Policy: &policy})
	c.AddChain(&nftables.Chain{Name: prefilter.FilterSYN, Table: t})
	c.AddChain(&nftables.Chain{Name: prefilter.FilterNew, Table: t})
	c.AddChain(&nftables.Chain{Name: prefilter.EnqueueSYN, Table: t})
	c.AddChain(&nftables.Chain{Name: prefilter.EnqueueNew, Table: t})
	for _, s := range []*nftables.Set{
		{Table: t, Name: prefilter.UIDMeter, KeyType: nftables.TypeUID, KeyByteOrder: binaryutil.NativeEndian, Dynamic: true, HasTimeout: true, Timeout: 10 * time.Second, Size: 65536,
			Comment: "each uid's rate of new connections to the daemon"},
		{Table: t, Name: prefilter.UIDMeterNew, KeyType: nftables.TypeUID, KeyByteOrder: binaryutil.NativeEndian, Dynamic: true, HasTimeout: true, Timeout: 10 * time.Second, Size: 65536,
			Comment: "each uid's rate of new UDP and echo flows to the daemon"},
		{Table: t, Name: prefilter.UIDOver, KeyType: nftables.TypeUID, KeyByteOrder: binaryutil.NativeEndian, Dynamic: true, Size: 65536,
			Comment: "each uid's new flows over its budget, counted"},
	} {
		if err := c.AddSet(s, nil); err != nil {
			return fmt.Errorf("add set %s: %w", s.Name, err)
		}
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("create table inet %s, its sets and chains: %w", TableName, err)
	}
	// google/nftables cannot say that a map's data (a mark) is in host
	// order, and nft then prints every mark byte-swapped: these maps are
	// made by hand.
	var marks []*nftables.Set
	for i := range d.fams {
		for j := range d.fams[i].protos {
			if m := d.fams[i].protos[j].outMark; m != nil {
				marks = append(marks, m)
			}
		}
	}
	if len(marks) == 0 {
		return nil
	}
	if err := d.batches.AddHostDataMaps(marks); err != nil {
		return fmt.Errorf("add maps of marks: %w", err)
	}
	return nil
}

// rules returns every rule of both chains, in order.
func (d *Datapath) rules(first, total uint16, native bool) []nftbatch.Rule {
	// Loopback traffic never leaves the host, and the daemon's health
	// probes choose their uplink themselves: leave them alone.
	rules := []nftbatch.Rule{{Chain: "output", Exprs: nftbatch.Exprs(
		&expr.Meta{Key: expr.MetaKeyOIFTYPE, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint16(unix.ARPHRD_LOOPBACK)},
		&expr.Verdict{Kind: expr.VerdictAccept},
	)}, {Chain: "output", Exprs: nftbatch.Exprs(
		&expr.Meta{Key: expr.MetaKeyPRIORITY, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(ProbePriority)},
		&expr.Verdict{Kind: expr.VerdictAccept},
	)}}
	rules = append(rules, d.nativeRules()...)
	// A socket steered at connect() is on its uplink's address with its
	// mark: nothing to decide or translate; nor is a host-marked socket
	// bound to its uplink's address.
	onUplink := slices.Clone(d.steered)
	for _, h := range d.hostMarks {
		onUplink = append(onUplink, Steered{Mark: h.Mark, Addr: h.Addr})
	}
	// A TCP socket there is accepted here for its SYN only: its other
	// packets meet the translation rules, which translate a socket the
	// daemon moved to another port (its tuple was a translation's) and
	// let the others go on, untouched.
	for _, st := range onUplink {
		f := &d.fams[0]
		if st.Addr.Is6() {
			f = &d.fams[1]
		}
		on := []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{f.nfproto}},
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(st.Mark)},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: f.saddr, Len: uint32(f.addrLen)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: st.Addr.AsSlice()},
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		}
		if d.userspace {
			rules = append(rules, nftbatch.Rule{Chain: "output", Exprs: nftbatch.Exprs(append(on[:len(on)-1], &expr.Verdict{Kind: expr.VerdictAccept})...)})
			continue
		}
		rules = append(rules, nftbatch.Rule{Chain: "output", Exprs: nftbatch.Exprs(append(slices.Clone(on),
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{byte(ipproto.TCP)}},
			&expr.Verdict{Kind: expr.VerdictAccept})...)})
		rules = append(rules, nftbatch.Rule{Chain: "output", Exprs: nftbatch.Exprs(append(append(on,
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(ipproto.TCP)}}),
			append(tcpFlags(0x17, 0x02), &expr.Verdict{Kind: expr.VerdictAccept})...)...)})
	}
	// A host-marked SYN of an uplink that is up is decided here.
	for i := range d.fams {
		rules = append(rules, d.hostMarkRules(&d.fams[i], &d.fams[i].protos[0])...)
	}
	// Every other SYN, either family, goes to the daemon, translated
	// flows' retransmissions too: the daemon checks that the socket is
	// still the one it translated.
	rules = append(rules, nftbatch.Rule{Chain: "output", Exprs: nftbatch.Exprs(append([]expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(ipproto.TCP)}},
	}, append(tcpFlags(0x17, 0x02), &expr.Verdict{Kind: expr.VerdictJump, Chain: prefilter.FilterSYN})...)...)})
	// ICMP errors (destination unreachable, fragmentation needed or packet
	// too big, time exceeded, parameter problem) go to the daemon, which
	// readdresses those that quote a translated flow. They are rare; path
	// MTU discovery needs them. Ones the host sends itself come in on lo.
	if d.DefragErr == nil {
		rules = append(rules, defragRule())
	}
	for _, r := range []struct {
		nfproto byte
		proto   ipproto.Proto
		lo, hi  byte
	}{
		{unix.NFPROTO_IPV4, ipproto.ICMP, 3, 3},
		{unix.NFPROTO_IPV4, ipproto.ICMP, 11, 12},
		{unix.NFPROTO_IPV6, ipproto.ICMPv6, 1, 4},
	} {
		rules = append(rules, nftbatch.Rule{Chain: "prerouting", Exprs: nftbatch.Exprs(
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{r.nfproto}},
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(r.proto)}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
			&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{r.lo}, ToData: []byte{r.hi}},
			nftfeat.QueueTo(first, total, native, false, true), // about any traffic: never held back
		)})
	}
	rules = append(rules, d.takenRules()...)
	return append(rules, d.flowRules(first, total, native)...)
}

// defragRule makes the kernel reassemble IP fragments before the
// prerouting chain, without connection tracking. A translated flow needs
// it: only a datagram's first fragment carries the ports its element is
// found by, so without reassembly the reply's first fragment would be
// readdressed to the socket and the others not, and the datagram never
// completes. Reassembly (nf_defrag_ipv4/ipv6, priority -400) is what
// conntrack enables too; here a transparent-proxy expression enables it,
// for both families of the namespace, for as long as the rule exists. The
// rule itself never matches: a packet is not IPv4 and IPv6 at once. (A
// locally sent datagram larger than the MTU needs nothing: it crosses the
// output hook whole and is fragmented after the translation.)
func defragRule() nftbatch.Rule {
	return nftbatch.Rule{Chain: "prerouting", Exprs: nftbatch.Exprs(
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV6}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(ipproto.UDP)}},
		&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(9)},
		&expr.TProxy{Family: unix.NFPROTO_UNSPEC, TableFamily: unix.NFPROTO_INET, RegPort: 1},
	)}
}

// flowRules returns the per-flow rules: the kernel datapath's translation
// rules or the userspace datapath's selectors, then for UDP and ICMP echo
// the cached "untranslated" decisions and the queueing of new flows. All
// rules are sent by hand (nftbatch): an IPv6 address write must fix the
// transport checksum's pseudo-header sum without an IP header checksum to
// fix (csum_flags without csum_type), which google/nftables cannot express.
func (d *Datapath) flowRules(first, total uint16, native bool) []nftbatch.Rule {
	var rules []nftbatch.Rule
	for i := range d.fams {
		f := &d.fams[i]
		for j := range f.protos {
			p := &f.protos[j]
			outKey := loadTuple(f, f.saddr, p.sport, f.daddr, p.dport)
			inKey := loadTuple(f, f.daddr, p.dport, f.saddr, p.sport)
			if d.userspace {
				rules = append(rules,
					nftbatch.Rule{Chain: "output", Exprs: nftbatch.Exprs(append(append(matchProto(f, p, 0), outKey...),
						&expr.Lookup{SourceRegister: 8, SetName: p.out.Name},
						nftfeat.QueueTo(first, total, native, false, !d.filter.FailClosed))...)},
					nftbatch.Rule{Chain: "prerouting", Exprs: nftbatch.Exprs(append(append(matchProto(f, p, 1), inKey...),
						&expr.Lookup{SourceRegister: 8, SetName: p.in.Name},
						nftfeat.QueueTo(first, total, native, false, !d.filter.FailClosed))...)})
				continue
			}
			// Registers: the key from 8 on, then the lookups' results:
			// address, port, mark (IPv6: 8-17, 18-21, 22, 23).
			regs := uint32(f.addrLen / 4)
			addrReg := 8 + 2*regs + 2
			portReg, markReg := addrReg+regs, addrReg+regs+1
			// An IPv4 UDP datagram may carry no checksum (zero), which a
			// port write fixing the checksum would turn into a wrong one:
			// such datagrams get their own rules, whose port write leaves
			// the checksum alone.
			var variants []*expr.Cmp
			for _, v := range checksumVariants(f, p) {
				variants = append(variants, v.cmp)
			}
			lookup := func(s *nftables.Set, reg uint32) expr.Any {
				return &expr.Lookup{SourceRegister: 8, DestRegister: reg, IsDestRegSet: true, SetName: s.Name}
			}
			for _, v := range variants {
				match := func(dir int) []expr.Any {
					m := matchProto(f, p, dir)
					if v != nil {
						m = append(m, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: p.csum, Len: 2}, v)
					}
					return m
				}
				fix := v == nil || v.Op == expr.CmpOpNeq
				// Outbound: socket tuple -> new source, port, mark. An
				// echo keeps its identifier. Every lookup comes first:
				// the key's registers are clobbered below, and a packet
				// is changed only when all its flow's elements are found.
				look := append(match(0), outKey...)
				look = append(look, lookup(p.out, addrReg), lookup(p.outMark, markReg))
				if !p.isEcho() {
					look = append(look, lookup(p.outPort, portReg))
				}
				out := nftbatch.Exprs(look...)
				out = append(out, nftbatch.AddrWrite(f.addrLen, f.saddr, addrReg))
				// The new source must still be the host's: an address
				// that went away (renumbering) must not reach the wire.
				// Such a packet stops here, flagged, and the rule after
				// the translation rules drops it.
				out = append(out, nftbatch.Exprs(
					&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(StaleMark)},
					&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
					&expr.Fib{Register: 1, FlagSADDR: true, ResultADDRTYPE: true},
					&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)})...)
				if !p.isEcho() {
					out = append(out, nftbatch.Exprs(writePort(p, p.sport, portReg, fix))...)
				}
				out = append(out, nftbatch.Exprs(&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: markReg},
					&expr.Verdict{Kind: expr.VerdictAccept})...)
				rules = append(rules, nftbatch.Rule{Chain: "output", Exprs: out},
					nftbatch.Rule{Chain: "prerouting", Exprs: inbound(f, p, match(1), nil, fix)})
			}
		}
	}
	if !d.userspace {
		rules = append(rules, nftbatch.Rule{Chain: "output", Exprs: nftbatch.Exprs(
			&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(StaleMark)},
			&expr.Counter{},
			&expr.Verdict{Kind: expr.VerdictDrop})})
	}
	// UDP and ICMP echo have no SYN: the first packet of every tuple not
	// yet decided goes to the daemon, which caches its decision. Queues are
	// picked by address hash, so one flow's packets meet one worker.
	//
	// A UDP tuple a peer opened (a datagram to a local address that no
	// translation claimed: a query to a server on this host) is learned in
	// the kernel, refreshed by every inbound datagram, so the server's
	// answers pass as they are: they must come from the address the peer
	// asked, whatever a rule says, and need no trip to the daemon.
	for i := range d.fams {
		f := &d.fams[i]
		for j := range f.protos {
			p := &f.protos[j]
			if p.pass == nil {
				continue
			}
			sockTuple := loadTuple(f, f.saddr, p.sport, f.daddr, p.dport)
			toLocal := []expr.Any{
				&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
			}
			rules = append(rules, nftbatch.Rule{Chain: "output", Exprs: nftbatch.Exprs(append(append(matchProto(f, p, 0), sockTuple...),
				&expr.Lookup{SourceRegister: 8, SetName: p.pass.Name},
				&expr.Verdict{Kind: expr.VerdictAccept})...)})
			if p.seen != nil {
				rules = append(rules,
					nftbatch.Rule{Chain: "output", Exprs: nftbatch.Exprs(append(append(matchProto(f, p, 0), sockTuple...),
						&expr.Lookup{SourceRegister: 8, SetName: p.seen.Name},
						&expr.Verdict{Kind: expr.VerdictAccept})...)},
					// Known tuples are refreshed; a new one is learned
					// within its source's budget.
					nftbatch.Rule{Chain: "prerouting", Exprs: nftbatch.Exprs(append(append(append(matchProto(f, p, 1), toLocal...),
						loadTuple(f, f.daddr, p.dport, f.saddr, p.sport)...),
						&expr.Lookup{SourceRegister: 8, SetName: p.seen.Name},
						&expr.Dynset{SrcRegKey: 8, SetName: p.seen.Name, Operation: unix.NFT_DYNSET_OP_UPDATE, Timeout: d.seenFor},
						&expr.Verdict{Kind: expr.VerdictAccept})...)},
					nftbatch.Rule{Chain: "prerouting", Exprs: nftbatch.Exprs(append(append(append(append(matchProto(f, p, 1), toLocal...),
						&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: f.saddr, Len: p.meter.KeyType.Bytes},
						&expr.Dynset{SrcRegKey: 1, SetName: p.meter.Name, Operation: unix.NFT_DYNSET_OP_UPDATE, Timeout: meterFor,
							Exprs: []expr.Any{&expr.Limit{Type: expr.LimitTypePkts, Rate: learnRate, Unit: expr.LimitTimeSecond, Burst: learnBurst}}}),
						loadTuple(f, f.daddr, p.dport, f.saddr, p.sport)...),
						&expr.Dynset{SrcRegKey: 8, SetName: p.seen.Name, Operation: unix.NFT_DYNSET_OP_UPDATE, Timeout: d.seenFor})...)})
			}
			rules = append(rules, d.hostMarkRules(f, p)...)
			rules = append(rules, nftbatch.Rule{Chain: "output", Exprs: nftbatch.Exprs(append(matchProto(f, p, 0), &expr.Verdict{Kind: expr.VerdictJump, Chain: prefilter.FilterNew})...)})
		}
	}
	return rules
}

// checksumVariant is a condition on a datagram's checksum, and whether
// a port write must fix it.
type checksumVariant struct {
	cmp *expr.Cmp // nil: none
	fix bool
}

// checksumVariants: an IPv4 UDP datagram may carry no checksum (zero),
// which a port write fixing the checksum would turn into a wrong one: such
// datagrams get rules of their own, whose port write leaves it alone.
func checksumVariants(f *family, p *proto) []checksumVariant {
	if p.num == ipproto.UDP && f.nfproto == unix.NFPROTO_IPV4 {
		return []checksumVariant{
			{&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0}}, true},
			{&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0, 0}}, false},
		}
	}
	return []checksumVariant{{nil, true}}
}

// inbound is the translation rule of replies: to the translated tuple ->
// the socket's address and port, after match and the conditions pre (which
// may use the key's registers, and one register after them).
func inbound(f *family, p *proto, match, pre []expr.Any, fix bool) [][]byte {
	regs := uint32(f.addrLen / 4)
	addrReg := 8 + 2*regs + 2
	portReg := addrReg + regs
	lookup := func(s *nftables.Set, reg uint32) expr.Any {
		return &expr.Lookup{SourceRegister: 8, DestRegister: reg, IsDestRegSet: true, SetName: s.Name}
	}
	look := append(append(slices.Clone(match), loadTuple(f, f.daddr, p.dport, f.saddr, p.sport)...), pre...)
	look = append(look, lookup(p.in, addrReg))
	if !p.isEcho() {
		look = append(look, lookup(p.inPort, portReg))
	}
	in := nftbatch.Exprs(look...)
	in = append(in, nftbatch.AddrWrite(f.addrLen, f.daddr, addrReg))
	if !p.isEcho() {
		in = append(in, nftbatch.Exprs(writePort(p, p.dport, portReg, fix))...)
	}
	return append(in, nftbatch.Exprs(&expr.Verdict{Kind: expr.VerdictAccept})...)
}

// matchProto matches one family's protocol in an inet chain; for ICMP, the
// echo request (dir 0, outbound) or reply (dir 1, inbound).
func matchProto(f *family, p *proto, dir int) []expr.Any {
	m := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{f.nfproto}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(p.num)}},
	}
	if p.isEcho() {
		m = append(m,
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p.echo[dir]}})
	}
	return m
}

// loadTuple loads address at a1 . port at p1 . address at a2 . port at p2
// into registers from 8 on, as a concatenated key.
func loadTuple(f *family, a1, p1, a2, p2 uint32) []expr.Any {
	regs := uint32(f.addrLen / 4)
	return []expr.Any{
		&expr.Payload{DestRegister: 8, Base: expr.PayloadBaseNetworkHeader, Offset: a1, Len: uint32(f.addrLen)},
		&expr.Payload{DestRegister: 8 + regs, Base: expr.PayloadBaseTransportHeader, Offset: p1, Len: 2},
		&expr.Payload{DestRegister: 9 + regs, Base: expr.PayloadBaseNetworkHeader, Offset: a2, Len: uint32(f.addrLen)},
		&expr.Payload{DestRegister: 9 + 2*regs, Base: expr.PayloadBaseTransportHeader, Offset: p2, Len: 2},
	}
}

// tcpFlags matches TCP flags & mask == want.
func tcpFlags(mask, want byte) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{mask}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{want}},
	}
}

// writePort sets a TCP or UDP port, fixing the transport checksum if fix.
func writePort(p *proto, off, reg uint32, fix bool) expr.Any {
	w := &expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: reg, Base: expr.PayloadBaseTransportHeader,
		Offset: off, Len: 2}
	if fix {
		w.CsumType, w.CsumOffset = expr.CsumTypeInet, p.csum
	}
	return w
}

// Op is one change to the flow maps.
type Op struct {
	Entry
	Delete bool
}

// Add installs the map elements of entries in one transaction.
func (d *Datapath) Add(entries ...Entry) error { return d.Apply(ops(entries, false)) }

// Delete removes the map elements of entries in one transaction.
func (d *Datapath) Delete(entries ...Entry) error { return d.Apply(ops(entries, true)) }

func ops(es []Entry, del bool) []Op {
	out := make([]Op, len(es))
	for i, e := range es {
		out[i] = Op{Entry: e, Delete: del}
	}
	return out
}

// ErrFamily is returned for entries that mix address families.
var ErrFamily = errors.New("a flow's addresses must all be IPv4 or all IPv6")

// ErrProtocol is returned for entries of a protocol the table has no sets
// for: TCP, UDP and ICMP or ICMPv6 echo (by family) are handled, and only
// UDP and echo flows may pass untranslated.
var ErrProtocol = errors.New("unsupported flow protocol")

// Apply makes the changes in order, in one transaction: all or none.
func (d *Datapath) Apply(changes []Op) error {
	if len(changes) == 0 {
		return nil
	}
	for i := range changes {
		c := &changes[i].Entry
		v4 := c.Src.Addr().Is4()
		if c.Dst.Addr().Is4() != v4 || (!c.Pass && c.NewSrc.Addr().Is4() != v4) { // a pass has no NewSrc
			return ErrFamily
		}
		if p := d.proto(c); p == nil || (c.Pass && p.pass == nil) {
			return fmt.Errorf("%w: protocol %d, pass %v", ErrProtocol, c.Proto, c.Pass)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.transactions.Add(1)
	if err := d.batches.Send(flowBatch(&d.batches.Writer, changes, d.proto)); err != nil {
		return fmt.Errorf("apply %d flow changes: %w", len(changes), err)
	}
	return nil
}

// Transactions is how many per-flow transactions were sent to the kernel.
func (d *Datapath) Transactions() uint64 { return d.transactions.Load() }

// Entries lists the flows installed in the kernel maps and pass sets (the
// kernel datapath; the userspace datapath's sets hold keys only).
func (d *Datapath) Entries() ([]Entry, error) {
	if d.userspace {
		return nil, errors.New("the userspace datapath keeps translations in the daemon")
	}
	d.listMu.Lock()
	defer d.listMu.Unlock()
	var out []Entry
	for i := range d.fams {
		f := &d.fams[i]
		ap := f.addrLen + 4 // address, then port padded to a register
		for j := range f.protos {
			p := &f.protos[j]
			// Each outbound field's map, by key: the source address's
			// lists the flows, the others complete them.
			var ports, marks map[string][]byte
			for _, m := range []struct {
				s    *nftables.Set
				into *map[string][]byte
				n    int
			}{{p.outPort, &ports, 2}, {p.outMark, &marks, 4}} {
				if m.s == nil {
					continue
				}
				els, err := d.conn.GetSetElements(m.s)
				if err != nil {
					return nil, fmt.Errorf("list map %s: %w", m.s.Name, err)
				}
				*m.into = make(map[string][]byte, len(els))
				for _, el := range els {
					if len(el.Key) != 2*ap || len(el.Val) != m.n {
						return nil, fmt.Errorf("map %s: element of unexpected size %d:%d", m.s.Name, len(el.Key), len(el.Val))
					}
					(*m.into)[string(el.Key)] = el.Val
				}
			}
			for _, s := range []*nftables.Set{p.out, p.pass} {
				if s == nil {
					continue
				}
				els, err := d.conn.GetSetElements(s)
				if err != nil {
					return nil, fmt.Errorf("list set %s: %w", s.Name, err)
				}
				for _, el := range els {
					if len(el.Key) != 2*ap || (s == p.out && len(el.Val) != f.addrLen) {
						return nil, fmt.Errorf("set %s: element of unexpected size %d:%d", s.Name, len(el.Key), len(el.Val))
					}
					e := Entry{Proto: p.num, Src: parseAddrPort(el.Key[:ap]), Dst: parseAddrPort(el.Key[ap:])}
					if s == p.pass {
						e.Pass, e.NewSrc = true, e.Src
						out = append(out, e)
						continue
					}
					a, _ := netip.AddrFromSlice(el.Val)
					port := e.Src.Port() // an echo keeps its identifier
					if ports != nil {
						v, ok := ports[string(el.Key)]
						if !ok {
							return nil, fmt.Errorf("map %s: no element for %v -> %v", p.outPort.Name, e.Src, e.Dst)
						}
						port = binary.BigEndian.Uint16(v)
					}
					v, ok := marks[string(el.Key)]
					if !ok {
						return nil, fmt.Errorf("map %s: no element for %v -> %v", p.outMark.Name, e.Src, e.Dst)
					}
					e.NewSrc, e.Mark = netip.AddrPortFrom(a, port), binary.NativeEndian.Uint32(v)
					out = append(out, e)
				}
			}
		}
	}
	return out, nil
}

// Use is the packet count of one UDP or echo flow's element.
type Use struct {
	Proto    ipproto.Proto
	Reply    bool           // the inbound element: Src is the wire's source (the reply's destination)
	Src, Dst netip.AddrPort // as in the element's key
	Packets  uint64
}

// Uses lists the packet counts of every UDP and echo element, translated
// or passed, for idle timeouts.
func (d *Datapath) Uses() ([]Use, error) {
	d.listMu.Lock()
	defer d.listMu.Unlock()
	var out []Use
	for i := range d.fams {
		f := &d.fams[i]
		ap := f.addrLen + 4
		for j := range f.protos {
			p := &f.protos[j]
			if !p.counted() {
				continue
			}
			for _, s := range []*nftables.Set{p.out, p.in, p.pass} {
				els, err := d.conn.GetSetElements(s)
				if err != nil {
					return nil, fmt.Errorf("list set %s: %w", s.Name, err)
				}
				for _, el := range els {
					if len(el.Key) != 2*ap {
						return nil, fmt.Errorf("set %s: key of unexpected size %d", s.Name, len(el.Key))
					}
					u := Use{Proto: p.num, Reply: s == p.in, Src: parseAddrPort(el.Key[:ap]), Dst: parseAddrPort(el.Key[ap:])}
					if el.Counter != nil {
						u.Packets = el.Counter.Packets
					}
					out = append(out, u)
				}
			}
		}
	}
	return out, nil
}

// Sets returns the names of the table's sets and maps: for each family
// (IPv4, then IPv6) and protocol (tcp, udp, icmp), outbound and inbound
// (the addresses' first: the sets Entries and Uses read), then the ports'
// and marks' maps, the pass set, the learned set and the meter if the
// protocol has them.
func (d *Datapath) Sets() []string {
	var names []string
	for i := range d.fams {
		for j := range d.fams[i].protos {
			p := &d.fams[i].protos[j]
			names = append(names, p.out.Name, p.in.Name)
			for _, s := range []*nftables.Set{p.outPort, p.outMark, p.inPort, p.pass, p.seen, p.meter} {
				if s != nil {
					names = append(names, s.Name)
				}
			}
		}
	}
	return names
}

func parseAddrPort(b []byte) netip.AddrPort {
	n := len(b) - 4
	a, _ := netip.AddrFromSlice(b[:n])
	return netip.AddrPortFrom(a, binary.BigEndian.Uint16(b[n:]))
}
