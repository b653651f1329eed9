package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/rerouted/rerouted/bench"
	"github.com/rerouted/rerouted/networld"
)

// cmdBench measures rerouted against the limit and MASQUERADE in one run.
func cmdBench(args []string) int {
	o := bench.Options{Out: os.Stdout}
	var record string
	flags("bench", args, func(fs *flag.FlagSet) {
		fs.IntVar(&o.Rounds, "rounds", 3, "measurements of each path (alternating); figures are medians")
		fs.DurationVar(&o.BulkTime, "bulk", 3*time.Second, "duration of each bulk transfer")
		fs.IntVar(&o.Conns, "conns", 2000, "connections per connection-rate measurement")
		fs.IntVar(&o.Parallel, "parallel", 8, "concurrent connections for the parallel rate")
		fs.IntVar(&o.Scale, "scale", 100000, "live flows for the scale measurement (0 skips it)")
		fs.StringVar(&record, "record", "", "also write the table and the machine into this Markdown file (e.g. BENCHMARKS.md)")
		fs.Func("paths", pathsHelp(), func(v string) error { o.Paths = strings.Split(v, ","); return nil })
	})
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "rerouted bench builds network namespaces and needs root")
		return exitFailure
	}
	bin, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "rerouted bench: %v\n", err)
		return exitFailure
	}
	o.Bin = bin
	o.HoldCommand = []string{bin, "bench-client"}
	var table bytes.Buffer
	o.Out = io.MultiWriter(os.Stdout, &table)
	machine := bench.Machine()
	fmt.Printf("machine: %s\n", machine)
	results, scale, err := bench.Run(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rerouted bench: %v\n", err)
		return exitFailure
	}
	if record != "" {
		var sec bytes.Buffer
		fmt.Fprintf(&sec, "Measured by `rerouted bench --rounds %d --bulk %s --conns %d --parallel %d --scale %d%s` on %s.\n",
			o.Rounds, o.BulkTime, o.Conns, o.Parallel, o.Scale, pathsFlag(o.Paths), machine)
		bench.Table(&sec, results)
		if scale != nil {
			bench.ScaleTable(&sec, *scale)
		}
		if err := bench.Record(record, sec.String()); err != nil {
			fmt.Fprintf(os.Stderr, "rerouted bench: %v\n", err)
			return exitFailure
		}
		fmt.Printf("recorded in %s\n", record)
	}
	return exitOK
}

// cmdBenchClient is the bench's helper process: it holds many connections
// (a process may have only so many sockets). Not for operators.
func cmdBenchClient(args []string) int {
	var addrs string
	var n int
	flags("bench-client", args, func(fs *flag.FlagSet) {
		fs.StringVar(&addrs, "connect", "", "ADDR:PORT[,ADDR:PORT...]")
		fs.IntVar(&n, "many", 0, "connections to open and hold until stdin closes")
	})
	if err := networld.HoldMany(strings.Split(addrs, ","), n, 5*time.Second, os.Stdin, os.Stdout); err != nil {
		fmt.Println("error:", err)
		return exitFailure
	}
	return exitOK
}

func pathsHelp() string {
	var b strings.Builder
	b.WriteString("comma-separated paths to measure (default: those marked *):")
	for _, p := range bench.Paths {
		mark := " "
		if p.Default {
			mark = "*"
		}
		fmt.Fprintf(&b, "\n  %s %s: %s", mark, p.Name, p.About)
	}
	return b.String()
}

func pathsFlag(paths []string) string {
	if len(paths) == 0 {
		return ""
	}
	return " --paths " + strings.Join(paths, ",")
}
