package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"

	"github.com/rerouted/rerouted/internal/control"
	acct "github.com/rerouted/rerouted/internal/usage"
)

// cmdUsage prints what each owner sent and received on each uplink.
func cmdUsage(args []string) int {
	var file, by, up string
	var asJSON bool
	flags("usage", args, func(fs *flag.FlagSet) {
		configFlag(fs, &file, "configuration file (for the control socket's path)")
		fs.StringVar(&by, "by", "user", "break usage down by user, cgroup, exe or rule")
		fs.StringVar(&up, "uplink", "", "only this uplink (\"default\": the host's own routing)")
		fs.BoolVar(&asJSON, "json", false, "print the report as JSON: every owner's counts on every uplink")
	})
	if !slices.Contains(acct.Kinds, by) {
		fmt.Fprintf(os.Stderr, "rerouted usage: --by must be one of %s, not %q\n", strings.Join(acct.Kinds, ", "), by)
		return exitUsage
	}
	cfg, code := loadConfig(file)
	if cfg == nil {
		return code
	}
	r, err := control.QueryUsage(cfg.Daemon.ControlSocket)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rerouted: %v\n", err)
		return exitFailure
	}
	if up != "" {
		if !slices.Contains(r.Uplinks, up) {
			fmt.Fprintf(os.Stderr, "rerouted usage: no uplink %q (counted: %s)\n", up, strings.Join(r.Uplinks, ", "))
			return exitUsage
		}
		r = filterUplink(r, up)
	}
	if asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(r); err != nil {
			fmt.Fprintf(os.Stderr, "rerouted: %v\n", err)
			return exitFailure
		}
		return exitOK
	}
	writeUsage(os.Stdout, r, by)
	return exitOK
}

func filterUplink(r acct.Report, up string) acct.Report {
	out := r
	out.Uplinks = []string{up}
	out.Rows = nil
	for _, row := range r.Rows {
		if row.Uplink == up {
			out.Rows = append(out.Rows, row)
		}
	}
	return out
}

// writeUsage prints owners down, uplinks across: each cell the bytes
// received and sent ("in / out"), then each owner's total, and the
// uplinks' totals last.
func writeUsage(w io.Writer, r acct.Report, by string) {
	cells := map[string]map[string]*acct.Counts{} // owner → uplink → counts
	totals := map[string]*acct.Counts{}
	for _, u := range r.Uplinks {
		totals[u] = &acct.Counts{}
	}
	for _, row := range r.Rows {
		name := row.Owner.Of(by)
		if name == "" {
			name = "-"
		}
		if cells[name] == nil {
			cells[name] = map[string]*acct.Counts{}
		}
		c := cells[name][row.Uplink]
		if c == nil {
			c = &acct.Counts{}
			cells[name][row.Uplink] = c
		}
		c.Add(row.Counts)
		if totals[row.Uplink] == nil {
			totals[row.Uplink] = &acct.Counts{}
		}
		totals[row.Uplink].Add(row.Counts)
	}
	sum := func(m map[string]*acct.Counts) acct.Counts {
		var t acct.Counts
		for _, c := range m {
			t.Add(*c)
		}
		return t
	}
	owners := make([]string, 0, len(cells))
	for o := range cells {
		owners = append(owners, o)
	}
	sort.Slice(owners, func(i, j int) bool {
		a, b := sum(cells[owners[i]]).Bytes(), sum(cells[owners[j]]).Bytes()
		if a != b {
			return a > b
		}
		return owners[i] < owners[j]
	})
	fmt.Fprintf(w, "usage since %s, in / out\n\n", r.Since.Local().Format("2006-01-02 15:04"))
	tw := tabwriter.NewWriter(w, 0, 0, 3, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "%s\t", strings.ToUpper(by))
	for _, u := range r.Uplinks {
		fmt.Fprintf(tw, "%s\t", u)
	}
	fmt.Fprint(tw, "total\t\n")
	cell := func(c *acct.Counts) string {
		if c == nil {
			return "-"
		}
		return size(c.BytesIn) + " / " + size(c.BytesOut)
	}
	for _, o := range owners {
		fmt.Fprintf(tw, "%s\t", o)
		for _, u := range r.Uplinks {
			fmt.Fprintf(tw, "%s\t", cell(cells[o][u]))
		}
		t := sum(cells[o])
		fmt.Fprintf(tw, "%s\t\n", cell(&t))
	}
	fmt.Fprint(tw, "TOTAL\t")
	for _, u := range r.Uplinks {
		fmt.Fprintf(tw, "%s\t", cell(totals[u]))
	}
	all := sum(totals)
	fmt.Fprintf(tw, "%s\t\n", cell(&all))
	tw.Flush()
}

// size is n bytes for a reader: 0 B, 812 B, 1.5 KiB, 23 MiB, 4.21 GiB.
func size(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	v, i := float64(n), -1
	for v >= unit && i < 5 {
		v /= unit
		i++
	}
	suffix := []string{"KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}[i]
	switch {
	case v < 10:
		return fmt.Sprintf("%.2f %s", v, suffix)
	case v < 100:
		return fmt.Sprintf("%.1f %s", v, suffix)
	}
	return fmt.Sprintf("%.0f %s", v, suffix)
}
