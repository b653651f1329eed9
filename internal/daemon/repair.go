package daemon

import (
	"context"
	"errors"
	"os"
	"strings"
	"time"

	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/nftdp"
	"github.com/rerouted/rerouted/internal/nftmon"
	"golang.org/x/sys/unix"
)

// The table is rerouted's promise: while it is gone, marked connections
// leave with the wrong source and translated flows break. Others remove it
// without meaning to: `nft flush ruleset` heads Debian's stock
// /etc/nftables.conf, so every `systemctl reload nftables` does it, and so
// do firewall managers that rewrite the whole ruleset. The guard watches
// the kernel's nftables notifications and puts back, at once, whatever
// others removed or slipped in: the table, its sets and chains, its rules,
// and every live flow's elements from the daemon's own flow table.

// tableCheckEvery is how often the guard checks the table even without a
// notification: a belt for the braces, cheap (no elements are read).
const tableCheckEvery = 10 * time.Second

// guardTable runs until ctx is done; it owns the monitor's socket.
func (d *Daemon) guardTable(ctx context.Context, m *nftmon.Monitor) {
	stop := context.AfterFunc(ctx, func() { m.SetDeadline(time.Now()) })
	defer stop()
	for {
		m.SetDeadline(time.Now().Add(tableCheckEvery))
		if ctx.Err() != nil { // stopped while the deadline was being set
			return
		}
		dmg, err := m.Next()
		if ctx.Err() != nil {
			return
		}
		switch {
		case err != nil && errors.Is(err, os.ErrDeadlineExceeded):
			dmg = &nftmon.Damage{At: time.Now()}
		case err != nil:
			d.errors[errRepair].Add(1)
			d.log.Error("nftables notifications: read failed; checking the table", "err", err)
			time.Sleep(100 * time.Millisecond)
			dmg = &nftmon.Damage{At: time.Now(), Overflow: true}
		}
		if dmg.Overflow || len(dmg.Lost)+len(dmg.Changed) == 0 {
			// Nothing said what happened: look.
			missing, err := d.dp.Missing()
			if err != nil {
				d.errors[errRepair].Add(1)
				d.log.Error("check table", "table", "inet "+nftdp.TableName, "err", err)
				continue
			}
			if len(missing) == 0 {
				if dmg.Overflow {
					// Lost notifications, nothing missing: another
					// program's busy ruleset. Put every flow's elements
					// back in case some of them were deleted, and no more.
					d.restoreElements()
				}
				continue
			}
			dmg.Lost = append(dmg.Lost, missing...)
		}
		d.repairTable(dmg)
	}
}

// repairTable puts the table back as the daemon keeps it: its structure and
// rules, then the elements of every flow in the flow table. Nothing else
// changes the table meanwhile: the flow table is held (no flow comes or
// goes) and so is the installer (no transaction interleaves).
func (d *Daemon) repairTable(dmg *nftmon.Damage) {
	d.inst().Exclusive(func() { d.repairTableHeld(dmg) })
}

// repairTableHeld is repairTable's work; call it inside d.inst().Exclusive.
func (d *Daemon) repairTableHeld(dmg *nftmon.Damage) {
	if err := d.dp.Repair(); err != nil {
		d.errors[errRepair].Add(1)
		d.log.Error("repair failed: marked connections may leave untranslated until the next attempt",
			"table", "inet "+nftdp.TableName, "damage", dmg.String(), "err", err)
		return
	}
	restored, failed := d.addAll()
	removed := 0
	if dmg.Foreign && !d.shared.Userspace {
		removed = d.removeForeign()
	}

	for _, what := range repairKinds(dmg) {
		d.metrics.Repairs.WithLabelValues(what).Inc()
	}
	by := dmg.By
	if by == "" {
		by = "unknown (found by a check)"
	}
	d.log.Warn("another program changed rerouted's table; repaired it",
		"table", "inet "+nftdp.TableName, "damage", dmg.String(), "by", by,
		"unprotected_for", time.Since(dmg.At).Round(100*time.Microsecond),
		"flows_restored", restored, "flows_failed", failed, "foreign_elements_removed", removed)
}

// restoreElements adds every flow's elements again, where they may have
// been deleted unseen.
func (d *Daemon) restoreElements() {
	var restored, failed int
	d.inst().Exclusive(func() { restored, failed = d.addAll() })
	d.log.Info("nftables notifications were lost (another program's busy ruleset); the table is whole, flows' elements re-added",
		"flows", restored, "failed", failed)
}

// addAll adds every flow's elements (again); elements that are there stay.
// Call inside d.inst().Exclusive.
func (d *Daemon) addAll() (restored, failed int) {
	flows := d.flows().Snapshot()
	changes := make([]nftdp.Op, 0, flow.MaxBatch)
	apply := func() {
		if err := d.dp.Apply(changes); err != nil {
			// One refused element fails the batch: the rest go one by one.
			for i := range changes {
				if err := d.dp.Apply(changes[i : i+1]); err != nil {
					failed++
					d.log.Error("repair: put back a flow's elements", "src", changes[i].Src, "dst", changes[i].Dst, "err", err)
				}
			}
		}
		changes = changes[:0]
	}
	for _, f := range flows {
		changes = append(changes, nftdp.Op{Entry: entry(f)})
		if len(changes) == flow.MaxBatch {
			apply()
		}
	}
	apply()
	return len(flows) - failed, failed
}

// removeForeign deletes elements of the kernel datapath's sets that no flow
// of the daemon's accounts for: another program added them.
func (d *Daemon) removeForeign() int {
	entries, err := d.dp.Entries()
	if err != nil {
		d.errors[errRepair].Add(1)
		d.log.Error("repair: list elements", "err", err)
		return 0
	}
	var foreign []nftdp.Entry
	for _, e := range entries {
		f := d.flows().Get(flow.Key{Proto: e.Proto, Src: e.Src, Dst: e.Dst})
		if f == nil || entry(f) != e {
			foreign = append(foreign, e)
		}
	}
	if len(foreign) == 0 {
		return 0
	}
	if err := d.dp.Delete(foreign...); err != nil {
		d.errors[errRepair].Add(1)
		d.log.Error("repair: remove elements others added", "elements", len(foreign), "err", err)
		return 0
	}
	return len(foreign)
}

// repairKinds names what a repair put back, for rerouted_repairs_total.
func repairKinds(dmg *nftmon.Damage) []string {
	seen := map[string]bool{}
	var out []string
	add := func(k string) {
		if !seen[k] {
			seen[k] = true
			out = append(out, k)
		}
	}
	for _, l := range dmg.Lost {
		switch {
		case l == "table":
			add("table")
		case strings.HasPrefix(l, "chain "):
			add("chain")
		case strings.HasPrefix(l, "rules "):
			add("rule")
		case strings.HasPrefix(l, "set "):
			add("set")
		case strings.HasPrefix(l, "elements "):
			add("element")
		}
	}
	if dmg.Foreign {
		add("foreign")
	}
	if len(out) == 0 {
		add("check")
	}
	return out
}

// benignRemoval reports whether a removal the kernel refused had nothing
// to remove: the element is gone already (the table was flushed or
// rebuilt meanwhile), which is what the removal wanted.
func benignRemoval(err error) bool { return errors.Is(err, unix.ENOENT) }
