package bench

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"runtime"
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
