// Package prefilter compiles the policy for the kernel: a new flow's first
// packet (a TCP SYN, a UDP datagram or an echo request the kernel has no
// decision for) goes to the daemon only if the policy may concern it.
// Chains filter_syn and filter_new hold the policy as nftables can test it
// in the output hook, rule by rule in the file's order (docs/design.md,
// "The table", shows them with the rest of the table). Keys the kernel
// cannot test here (process, exe, cgroup) count as "may match": the daemon
// decides. Destination lists, ports and ids live in sets named after the
// rule (f<generation>_r<n>_dst4 ...), a new generation for each policy: a
// reload installs the new sets, swaps the chains' rules in one
// transaction, then deletes the old sets. Compile makes a generation's sets
// and rules, those of the enqueue chains behind the filter (each user's
// budget, then the queues) included; nftdp installs them.
package prefilter

import (
	"encoding/binary"
	"fmt"
	"slices"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/nftdp/nftbatch"
	"github.com/rerouted/rerouted/internal/nftdp/nftfeat"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/policy/prefixset"
	"golang.org/x/sys/unix"
)

// Filter is the policy as the prefilter sees it.
type Filter struct {
	Rules      []policy.KernelRule
	HonorMarks bool
	// FailClosed: its queue verdicts have no bypass: without a daemon,
	// what it queues is dropped rather than let through untranslated.
	FailClosed bool
	// UIDRate: each user (socket uid) may send this many new TCP
	// connections a second to the daemon's queues, and as many new UDP
	// and echo flows (twice as many at once); the rest go to the overflow
	// queue, counted against that user. 0: no budget.
	UIDRate int
	// Overflow is the queue of flows over their user's budget: the daemon
	// serves it too, but a flood there cannot crowd out other users' flows
	// in the main queues. When it is full its packets are dropped (their
	// sockets retry), never let through untranslated; while no daemon
	// runs, they pass as the main queues' do.
	Overflow uint16
}

// FilterOf is cfg's filter.
func FilterOf(cfg *policy.Config) Filter {
	return Filter{Rules: cfg.KernelRules(), HonorMarks: cfg.Daemon.HonorMarks, FailClosed: cfg.Daemon.FailClosed,
		UIDRate: cfg.Daemon.NewFlowsPerUID, Overflow: OverflowQueue(cfg)}
}

// Union queues what either filter queues: while a reload swaps policies,
// a packet that either policy concerns reaches the daemon.
func Union(a, b Filter) Filter {
	u := Filter{HonorMarks: a.HonorMarks || b.HonorMarks, FailClosed: b.FailClosed, UIDRate: b.UIDRate, Overflow: b.Overflow}
	for _, f := range []Filter{a, b} {
		for _, r := range f.Rules {
			if r.Queue { // exemptions dropped: the union only queues more
				u.Rules = append(u.Rules, r)
			}
		}
	}
	return u
}

// Chains of the prefilter.
const (
	FilterSYN  = "filter_syn"
	FilterNew  = "filter_new"
	EnqueueSYN = "enqueue_syn" // each user's budget, then the queue
	EnqueueNew = "enqueue_new"
)

// Sets of the per-user budget.
const (
	UIDMeter    = "uid_meter"     // each uid's rate of new connections
	UIDMeterNew = "uid_meter_new" // each uid's rate of new UDP and echo flows
	UIDOver     = "uid_over"      // each uid's new flows over its budget, counted
)

// OverflowQueue is the queue after cfg's main queues: the one flows over
// their user's budget go to.
func OverflowQueue(cfg *policy.Config) uint16 {
	return cfg.Daemon.Queue + uint16(cfg.Daemon.Queues)
}

// Compiled is one generation of the prefilter: its sets (with their
// elements) and its rules.
type Compiled struct {
	Sets  []*nftables.Set
	Elems map[*nftables.Set][]nftables.SetElement
	Rules []nftbatch.Rule
}

// Family is what the prefilter needs of an address family's part of the
// table.
type Family struct {
	NFProto byte
	AddrLen int           // bytes
	Daddr   uint32        // the destination address's offset in the network header
	ICMP    ipproto.Proto // the family's echo: ICMP or ICMPv6
}

// Compile turns a filter into sets (of table t, named after generation
// gen) and rules for both chains, for families fams (IPv4, IPv6) and the
// queues first..first+total-1; native: the nft queue statement, else the
// xtables target.
func Compile(t *nftables.Table, fams [2]Family, first, total uint16, f Filter, gen int, native bool) Compiled {
	c := Compiled{Elems: map[*nftables.Set][]nftables.SetElement{}}
	set := func(name string, key nftables.SetDatatype, interval bool, elems []nftables.SetElement) string {
		s := &nftables.Set{Table: t, Name: fmt.Sprintf("f%d_%s", gen, name), KeyType: key, Interval: interval, Constant: true}
		if key == nftables.TypeUID || key == nftables.TypeGID {
			// Ids are in host order: so the set's userdata says, for
			// nft to print them right, which a constant set's cannot
			// (google/nftables gives those big-endian keys).
			s.Constant, s.KeyByteOrder = false, binaryutil.NativeEndian
		}
		c.Sets = append(c.Sets, s)
		c.Elems[s] = elems
		return s.Name
	}
	for _, chain := range []string{FilterSYN, FilterNew} {
		enqueue := EnqueueSYN
		if chain == FilterNew {
			enqueue = EnqueueNew
		}
		// The queue, behind each user's budget: a user over it goes to
		// the overflow queue, counted in uid_over.
		var budget []expr.Any
		if f.UIDRate > 0 {
			meter := UIDMeter
			if chain == FilterNew {
				meter = UIDMeterNew
			}
			budget = []expr.Any{
				&expr.Meta{Key: expr.MetaKeySKUID, Register: 1},
				&expr.Dynset{SrcRegKey: 1, SetName: meter, Operation: unix.NFT_DYNSET_OP_UPDATE, Timeout: 10 * time.Second,
					Exprs: []expr.Any{&expr.Limit{Type: expr.LimitTypePkts, Rate: uint64(f.UIDRate), Over: true, Unit: expr.LimitTimeSecond,
						Burst: uint32(2 * f.UIDRate)}}},
				&expr.Dynset{SrcRegKey: 1, SetName: UIDOver, Operation: unix.NFT_DYNSET_OP_ADD, Exprs: []expr.Any{&expr.Counter{}}},
				nftfeat.QueueTo(f.Overflow, 1, native, false, !f.FailClosed),
			}
			c.Rules = append(c.Rules, nftbatch.Rule{Chain: enqueue, Exprs: nftbatch.Exprs(budget...)})
		}
		// Counted: what the queue is offered, against what the daemon
		// receives, shows the kernel's silent fail-open (a full queue).
		c.Rules = append(c.Rules, nftbatch.Rule{Chain: enqueue, Exprs: nftbatch.Exprs(&expr.Counter{},
			nftfeat.QueueTo(first, total, native, chain == FilterSYN, !f.FailClosed))})
		// goto, not jump: a return from the enqueue chain goes back to
		// the output chain, past the filter.
		verdict := &expr.Verdict{Kind: expr.VerdictGoto, Chain: enqueue}
		if f.HonorMarks {
			c.Rules = append(c.Rules, nftbatch.Rule{Chain: chain, Exprs: nftbatch.Exprs(
				&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
				&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0, 0, 0}},
				verdict)})
		}
		protos := []ipproto.Proto{ipproto.TCP}
		if chain == FilterNew {
			protos = []ipproto.Proto{ipproto.UDP, ipproto.ICMP} // ICMP: the family's, ICMP or ICMPv6
		}
		for i, r := range f.Rules {
			if !r.Queue && !r.Exact {
				continue // it may or may not exempt: the rules after decide
			}
			for fi := range fams {
				fam := &fams[fi]
				for _, proto := range protos {
					if r.Protocols != nil && !slices.Contains(r.Protocols, proto) {
						continue
					}
					m := []expr.Any{
						&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
						&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{fam.NFProto}},
					}
					if chain == FilterNew {
						num := ipproto.UDP
						if proto == ipproto.ICMP {
							num = fam.ICMP
						}
						m = append(m, &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
							&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(num)}})
					}
					name := fmt.Sprintf("r%d_", i)
					v := fmt.Sprint(4 + 2*fi)
					ok := true
					for _, a := range []struct {
						k   prefixset.KernelAddrs
						neg bool
						n   string
					}{{r.Dst, false, "dst"}, {r.NotDst, true, "not_dst"}} {
						if !a.k.Set || a.k.Big[fi] {
							continue // no key, or may match
						}
						rs := a.k.Ranges[fi]
						if len(rs) == 0 {
							if !a.neg {
								ok = false // nothing of this family is in it
							}
							continue
						}
						key := nftables.TypeIPAddr
						if fi == 1 {
							key = nftables.TypeIP6Addr
						}
						m = append(m, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: fam.Daddr, Len: uint32(fam.AddrLen)})
						if len(rs) == 1 { // one range: compared in the rule, no set
							m = append(m, inRange(rs[0].First.AsSlice(), rs[0].Last.AsSlice(), a.neg))
							continue
						}
						sn := set(name+a.n+v, key, true, addrElems(rs))
						m = append(m, &expr.Lookup{SourceRegister: 1, SetName: sn, Invert: a.neg})
					}
					for _, p := range []struct {
						rs  []policy.PortRange
						neg bool
						n   string
					}{{r.Dports, false, "dport"}, {r.NotDports, true, "not_dport"}} {
						switch {
						case p.rs == nil:
						case proto == ipproto.ICMP && !p.neg:
							ok = false // an echo has no port
						case proto == ipproto.ICMP:
						default:
							m = append(m, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2})
							if len(p.rs) == 1 {
								m = append(m, inRange(binary.BigEndian.AppendUint16(nil, p.rs[0].Lo), binary.BigEndian.AppendUint16(nil, p.rs[0].Hi), p.neg))
								continue
							}
							sn := set(name+p.n, nftables.TypeInetService, true, portElems(p.rs))
							m = append(m, &expr.Lookup{SourceRegister: 1, SetName: sn, Invert: p.neg})
						}
					}
					for _, id := range []struct {
						ids []uint32
						neg bool
						key expr.MetaKey
						n   string
						typ nftables.SetDatatype
					}{{r.UIDs, false, expr.MetaKeySKUID, "uid", nftables.TypeUID}, {r.NotUIDs, true, expr.MetaKeySKUID, "not_uid", nftables.TypeUID},
						{r.GIDs, false, expr.MetaKeySKGID, "gid", nftables.TypeGID}, {r.NotGIDs, true, expr.MetaKeySKGID, "not_gid", nftables.TypeGID}} {
						if id.ids == nil {
							continue
						}
						if len(id.ids) == 1 {
							op := expr.CmpOpEq
							if id.neg {
								op = expr.CmpOpNeq
							}
							m = append(m, &expr.Meta{Key: id.key, Register: 1},
								&expr.Cmp{Op: op, Register: 1, Data: binaryutil.NativeEndian.PutUint32(id.ids[0])})
							continue
						}
						var els []nftables.SetElement
						for _, x := range id.ids {
							els = append(els, nftables.SetElement{Key: binaryutil.NativeEndian.PutUint32(x)})
						}
						sn := set(name+id.n, id.typ, false, els)
						m = append(m, &expr.Meta{Key: id.key, Register: 1},
							&expr.Lookup{SourceRegister: 1, SetName: sn, Invert: id.neg})
					}
					if !ok {
						continue
					}
					if r.Queue {
						m = append(m, verdict)
					} else {
						m = append(m, &expr.Verdict{Kind: expr.VerdictReturn})
					}
					c.Rules = append(c.Rules, nftbatch.Rule{Chain: chain, Exprs: nftbatch.Exprs(m...)})
				}
			}
		}
	}
	// Sets are per chain pass above; the same rule's sets would be made
	// twice (filter_syn, filter_new): keep one of each name.
	seen := map[string]bool{}
	sets := c.Sets[:0]
	for _, s := range c.Sets {
		if !seen[s.Name] {
			seen[s.Name] = true
			sets = append(sets, s)
		}
	}
	c.Sets = sets
	return c
}

// inRange matches register 1 (big-endian bytes: an address, a port)
// against lo..hi, or outside it with neg: a key of one value or range needs
// no set. (A large policy of single-port rules would otherwise be tens of
// thousands of sets, which the kernel creates one name lookup at a time.)
func inRange(lo, hi []byte, neg bool) expr.Any {
	op := expr.CmpOpEq
	if neg {
		op = expr.CmpOpNeq
	}
	if string(lo) == string(hi) {
		return &expr.Cmp{Op: op, Register: 1, Data: lo}
	}
	return &expr.Range{Op: op, Register: 1, FromData: lo, ToData: hi}
}

// addrElems are an interval set's elements for ranges: each range's first
// address, then the address after its last as an interval end (none after
// the family's last address).
func addrElems(rs []prefixset.AddrRange) []nftables.SetElement {
	var els []nftables.SetElement
	for _, r := range rs {
		els = append(els, nftables.SetElement{Key: r.First.AsSlice()})
		if next := r.Last.Next(); next.IsValid() {
			els = append(els, nftables.SetElement{Key: next.AsSlice(), IntervalEnd: true})
		}
	}
	return els
}

func portElems(rs []policy.PortRange) []nftables.SetElement {
	var els []nftables.SetElement
	for _, r := range rs {
		els = append(els, nftables.SetElement{Key: binary.BigEndian.AppendUint16(nil, r.Lo)})
		if r.Hi < 0xffff {
			els = append(els, nftables.SetElement{Key: binary.BigEndian.AppendUint16(nil, r.Hi+1), IntervalEnd: true})
		}
	}
	return els
}
