package main

import (
	"bytes"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/rerouted/rerouted/internal/bench"
	"github.com/rerouted/rerouted/internal/networld"
)

// cmdBench measures rerouted against the limit and MASQUERADE in one run.
func cmdBench(args []string) int {
	o := bench.Options{Out: os.Stdout}
	var record string
	var busy bool
	var daemonBin string
	flags("bench", args, func(fs *flag.FlagSet) {
		fs.IntVar(&o.Rounds, "rounds", 3, "measurements of each path (alternating); figures are medians")
		fs.DurationVar(&o.BulkTime, "bulk", 3*time.Second, "duration of each bulk transfer")
		fs.IntVar(&o.Conns, "conns", 2000, "connections per connection-rate measurement")
		fs.IntVar(&o.Parallel, "parallel", 8, "concurrent connections for the parallel rate")
		fs.IntVar(&o.Scale, "scale", 100000, "live flows for the scale measurement (0 skips it)")
		fs.StringVar(&record, "record", "", "also write the table and the machine into this Markdown file (e.g. BENCHMARKS.md)")
		fs.Func("paths", pathsHelp(), func(v string) error { o.Paths = strings.Split(v, ","); return nil })
		fs.BoolVar(&o.Untouched, "untouched", true, "also measure traffic no rule concerns, without and with rerouted")
		fs.BoolVar(&busy, "busy", false, "keep every CPU busy at normal priority during the whole run, as on a production host")
		daemonFlag(fs, &daemonBin)
	})
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "rerouted-lab bench builds network namespaces and needs root")
		return exitFailure
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintf(os.Stderr, "rerouted-lab bench: %v\n", err)
		return exitFailure
	}
	if o.Bin, err = findDaemon(daemonBin); err != nil {
		fmt.Fprintf(os.Stderr, "rerouted-lab bench: %v\n", err)
		return exitFailure
	}
	o.HoldCommand = []string{self, "bench-client"}
	if busy {
		o.BusyCommand = []string{self, "bench-busy"}
	}
	var table bytes.Buffer
	o.Out = io.MultiWriter(os.Stdout, &table)
	machine := bench.Machine()
	fmt.Printf("machine: %s\n", machine)
	rep, err := bench.Run(o)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rerouted-lab bench: %v\n", err)
		return exitFailure
	}
	if record != "" {
		var sec bytes.Buffer
		extra := pathsFlag(o.Paths)
		if busy {
			extra += " --busy"
		}
		fmt.Fprintf(&sec, "Measured by `rerouted-lab bench --rounds %d --bulk %s --conns %d --parallel %d --scale %d%s` on %s.\n",
			o.Rounds, o.BulkTime, o.Conns, o.Parallel, o.Scale, extra, machine)
		bench.Table(&sec, rep.Results)
		bench.PairedTable(&sec, rep.Results, rep.Rounds)
		if rep.Untouched != nil {
			bench.UntouchedTable(&sec, *rep.Untouched)
		}
		if rep.Scale != nil {
			bench.ScaleTable(&sec, *rep.Scale)
		}
		if err := bench.Record(record, sec.String()); err != nil {
			fmt.Fprintf(os.Stderr, "rerouted-lab bench: %v\n", err)
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

// cmdBenchBusy keeps every CPU busy until it is killed: the bench's busy
// host. Not for operators.
func cmdBenchBusy([]string) int {
	for i := 0; i < runtime.NumCPU(); i++ {
		go func() {
			runtime.LockOSThread()
			x := uint64(1)
			for x != 0 { // spins: that is the point
				x = x*6364136223846793005 + 1442695040888963407
			}
		}()
	}
	select {}
}
