package nftdp

import (
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/rerouted/rerouted/internal/nftdp/nftbatch"
	"github.com/rerouted/rerouted/internal/nftdp/nftfeat"
	"github.com/rerouted/rerouted/internal/nftdp/prefilter"
)

// The prefilter as the datapath installs it: package prefilter compiles the
// policy into sets and rules (docs/design.md, "The table"); here each
// generation's sets go in, the chains' rules are swapped in one
// transaction, and the previous generation's sets go.

// Steered is an uplink sockets are bound to at connect(): their packets
// carry its mark and its address.
type Steered struct {
	Mark uint32
	Addr netip.Addr
}

// SetSteered lets the packets of sockets steered at connect() pass the
// output chain without a decision: they are on their uplink already.
func (d *Datapath) SetSteered(s []Steered) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if slices.Equal(s, d.steered) {
		return nil
	}
	d.steered = slices.Clone(s)
	return d.applyRules()
}

// setsPerFlush bounds the sets and elements one prefilter transaction
// adds: google/nftables sends a transaction in one message, which the
// kernel refuses past its socket's buffer.
const setsPerFlush = 500

// filterFams describes the families for prefilter.Compile.
func (d *Datapath) filterFams() [2]prefilter.Family {
	var fs [2]prefilter.Family
	for i, f := range d.fams {
		fs[i] = prefilter.Family{NFProto: f.nfproto, AddrLen: f.addrLen, Daddr: f.daddr, ICMP: f.protos[2].num}
	}
	return fs
}

// SetFilter makes f the prefilter: its sets go in first, then both chains'
// rules are swapped with the rest of the table's in one transaction, then
// the previous generation's sets go.
func (d *Datapath) SetFilter(f prefilter.Filter) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.filter = f
	return d.applyFilter()
}

// applyFilter installs a new generation of d.filter and every rule of the
// table. Call with mu held.
func (d *Datapath) applyFilter() error {
	native := d.QueueMethod != nftfeat.QueueXT
	d.gen++
	c := prefilter.Compile(d.table, d.filterFams(), d.first, d.total, d.filter, d.gen, native)
	// The new generation's sets go in before any rule refers to them, in
	// as many transactions as the kernel takes (one message holds a few
	// hundred kilobytes); the rules then swap in one.
	d.listMu.Lock()
	elems := 0
	for i, s := range c.Sets {
		if err := d.conn.AddSet(s, c.Elems[s]); err != nil {
			d.listMu.Unlock()
			d.dropSets(c.Sets[:i])
			return fmt.Errorf("prefilter set %s: %w", s.Name, err)
		}
		if elems += 1 + len(c.Elems[s]); elems >= setsPerFlush || i == len(c.Sets)-1 {
			elems = 0
			if err := d.conn.Flush(); err != nil {
				d.listMu.Unlock()
				d.dropSets(c.Sets[:i+1])
				return fmt.Errorf("prefilter sets: %w", err)
			}
		}
	}
	d.listMu.Unlock()
	if err := d.swapRules(c.Rules, native); err != nil {
		d.dropSets(c.Sets)
		return err
	}
	old := d.filterSets
	d.filterSets, d.filterRules = c.Sets, c.Rules
	d.dropSets(old)
	return nil
}

// applyRules sets every rule of the table again, the prefilter's as they
// are (its sets stay): what a change of the uplinks' states (host marks,
// steered sockets) needs, which with a large policy is much less than a
// new generation of the prefilter. Call with mu held.
func (d *Datapath) applyRules() error {
	if d.filterRules == nil {
		return d.applyFilter()
	}
	return d.swapRules(d.filterRules, d.QueueMethod != nftfeat.QueueXT)
}

// swapRules replaces every rule of both base chains and the prefilter's
// chains with the table's own and filter's, in one transaction.
func (d *Datapath) swapRules(filter []nftbatch.Rule, native bool) error {
	rules := append(d.rules(d.first, d.total, native), filter...)
	d.listMu.Lock()
	if n, err := d.offeredNow(); err == nil && d.ruleCount != nil { // the replaced rules' counts go on (not an earlier run's)
		d.offeredBefore += n
	}
	d.listMu.Unlock()
	if err := d.batches.AddRules(rules, []string{"output", "prerouting", prefilter.FilterSYN, prefilter.FilterNew, prefilter.EnqueueSYN, prefilter.EnqueueNew}); err != nil {
		return fmt.Errorf("rules: %w", err)
	}
	d.ruleCount = map[string]int{}
	for _, r := range rules {
		d.ruleCount[r.Chain]++
	}
	return nil
}

// Offered is how many packets the prefilter has offered to the queue since
// the datapath was installed (counters of the rules in force, and of those
// they replaced).
func (d *Datapath) Offered() (uint64, error) {
	d.listMu.Lock()
	defer d.listMu.Unlock()
	n, err := d.offeredNow()
	return d.offeredBefore + n, err
}

// offeredNow sums the queue rules' counters. Call with listMu held.
func (d *Datapath) offeredNow() (uint64, error) {
	var n uint64
	for _, chain := range []string{prefilter.EnqueueSYN, prefilter.EnqueueNew} {
		rules, err := d.conn.GetRules(d.table, &nftables.Chain{Name: chain, Table: d.table})
		if err != nil {
			return 0, fmt.Errorf("list rules of chain %s: %w", chain, err)
		}
		for _, r := range rules {
			if len(r.Exprs) > 0 {
				if c, ok := r.Exprs[0].(*expr.Counter); ok {
					n += c.Packets
				}
			}
		}
	}
	return n, nil
}

// dropSets deletes sets no rule refers to any more, one by one: one that
// is gone already (a repair after a flush) must not keep the others.
func (d *Datapath) dropSets(sets []*nftables.Set) {
	d.listMu.Lock()
	defer d.listMu.Unlock()
	for _, s := range sets {
		d.conn.DelSet(s)
		d.conn.Flush() // an error: gone already, or referenced still; left for the next repair
	}
}

// OverBudget lists, per uid, how many new flows went past the per-user
// budget (failed open, or closed) since the daemon started.
func (d *Datapath) OverBudget() (map[uint32]uint64, error) {
	d.listMu.Lock()
	defer d.listMu.Unlock()
	els, err := d.conn.GetSetElements(&nftables.Set{Table: d.table, Name: prefilter.UIDOver, KeyType: nftables.TypeUID})
	if err != nil {
		return nil, fmt.Errorf("list set %s: %w", prefilter.UIDOver, err)
	}
	out := make(map[uint32]uint64, len(els))
	for _, el := range els {
		if len(el.Key) == 4 && el.Counter != nil {
			out[binaryutil.NativeEndian.Uint32(el.Key)] = el.Counter.Packets
		}
	}
	return out, nil
}
