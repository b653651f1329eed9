package bench

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// Table prints the results as a Markdown table: each figure, then its
// ratio to the limit and to MASQUERADE.
func Table(w io.Writer, rs []Result) {
	var limit, masq *Result
	for i := range rs {
		switch rs[i].Path {
		case "limit":
			limit = &rs[i]
		case "masquerade":
			masq = &rs[i]
		}
	}
	fmt.Fprintln(w, "\nEach figure: value (ratio to limit / ratio to masquerade). Connect latency: time to an established connection.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| path | upload Gbit/s | download Gbit/s | conn/s sequential | conn/s parallel | connect p50 / p99 sequential | connect p50 / p99 parallel |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|")
	for _, r := range rs {
		if r.Err != nil {
			fmt.Fprintf(w, "| %s | not measured: %v | | | | | |\n", r.Path, r.Err)
			continue
		}
		fig := func(v float64, of func(Result) float64, format string) string {
			s := fmt.Sprintf(format, v)
			rl, rm := "-", "-"
			if limit != nil && limit.Err == nil && of(*limit) > 0 {
				rl = fmt.Sprintf("%.2f", v/of(*limit))
			}
			if masq != nil && masq.Err == nil && of(*masq) > 0 {
				rm = fmt.Sprintf("%.2f", v/of(*masq))
			}
			return fmt.Sprintf("%s (%s / %s)", s, rl, rm)
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s / %s | %s / %s |\n", r.Path,
			fig(r.UpGbps, func(x Result) float64 { return x.UpGbps }, "%.2f"),
			fig(r.DownGbps, func(x Result) float64 { return x.DownGbps }, "%.2f"),
			fig(r.SeqRate, func(x Result) float64 { return x.SeqRate }, "%.0f"),
			fig(r.ParRate, func(x Result) float64 { return x.ParRate }, "%.0f"),
			us(r.SeqP50), us(r.SeqP99), us(r.ParP50), us(r.ParP99))
	}
}

// PairedTable prints, for each path, its figures over the baselines'
// measured in the same round (the limit, MASQUERADE, and the path it is a
// variant of), median over the rounds: a round's paths run seconds apart,
// so drift between rounds, which moves every path of a round alike,
// cancels. rounds[i][r] is path rs[i]'s figure in round r+1.
func PairedTable(w io.Writer, rs []Result, rounds [][]Result) {
	index := map[string]int{}
	for i, r := range rs {
		index[r.Path] = i
	}
	variantOf := map[string]string{}
	for _, p := range Paths {
		variantOf[p.Name] = p.Variant
	}
	type pair struct{ path, base int }
	var pairs []pair
	for i, r := range rs {
		for _, b := range []string{"limit", "masquerade", variantOf[r.Path]} {
			if j, ok := index[b]; ok && b != "" && j != i {
				pairs = append(pairs, pair{i, j})
			}
		}
	}
	if len(pairs) == 0 {
		return
	}
	fmt.Fprintln(w, "\nPaired: each round's figure over the baseline's in the same round, median over the rounds (drift between rounds cancels),")
	fmt.Fprintln(w, "and in parentheses the middle half of the rounds' ratios (with fewer than four rounds, all of them).")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| path | over | upload | download | conn/s sequential | conn/s parallel | rounds |")
	fmt.Fprintln(w, "|---|---|---|---|---|---|---|")
	for _, p := range pairs {
		var up, down, seq, par []float64
		for r := range min(len(rounds[p.path]), len(rounds[p.base])) {
			a, b := rounds[p.path][r], rounds[p.base][r]
			if a.Err != nil || b.Err != nil {
				continue
			}
			for _, f := range []struct {
				v    *[]float64
				x, y float64
			}{{&up, a.UpGbps, b.UpGbps}, {&down, a.DownGbps, b.DownGbps}, {&seq, a.SeqRate, b.SeqRate}, {&par, a.ParRate, b.ParRate}} {
				if f.y > 0 {
					*f.v = append(*f.v, f.x/f.y)
				}
			}
		}
		fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %d |\n", rs[p.path].Path, rs[p.base].Path,
			medianRatio(up), medianRatio(down), medianRatio(seq), medianRatio(par), len(seq))
	}
}

// medianRatio words the median of ratios, with the middle half of them
// (the interquartile range) as the spread; under four ratios, that is
// their whole range.
func medianRatio(v []float64) string {
	if len(v) == 0 {
		return "-"
	}
	slices.Sort(v)
	return fmt.Sprintf("%.2f (%.2f–%.2f)", v[len(v)/2], v[len(v)/4], v[(3*len(v))/4])
}

func us(d time.Duration) string { return fmt.Sprintf("%d µs", d.Microseconds()) }

// Machine describes where the figures were measured.
func Machine() string {
	var u unix.Utsname
	unix.Uname(&u)
	cpu := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	return fmt.Sprintf("%d CPUs (%s), Linux %s, %s, %s", runtime.NumCPU(), cpu,
		unix.ByteSliceToString(u.Release[:]), runtime.Version(), time.Now().UTC().Format("2006-01-02"))
}

// Markers delimit the section of BENCHMARKS.md that `rerouted-lab bench
// --record` rewrites.
const (
	markStart = "<!-- rerouted bench: start -->"
	markEnd   = "<!-- rerouted bench: end -->"
)

// Record replaces the recorded section of file with section.
func Record(file, section string) error {
	old, err := os.ReadFile(file)
	if err != nil && !os.IsNotExist(err) {
		return err
	}
	block := markStart + "\n" + strings.TrimSpace(section) + "\n" + markEnd
	i, j := bytes.Index(old, []byte(markStart)), bytes.Index(old, []byte(markEnd))
	var out []byte
	if i >= 0 && j > i {
		out = append(append(append(out, old[:i]...), block...), old[j+len(markEnd):]...)
	} else {
		out = append(append(old, '\n'), block+"\n"...)
	}
	return os.WriteFile(file, out, 0o644)
}
