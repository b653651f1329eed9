// Command rerouted-lab runs rerouted in a namespace world: the demo (the
// problem and the fix) and the bench (rerouted against the limit and
// MASQUERADE). It builds namespaces, addresses, routes and nftables tables
// with ip and nft, as an operator would; that is why it is a command of its
// own: the daemon, cmd/rerouted, never runs them and does not link this
// world (cmd/rerouted's TestDaemonDoesNotLinkTheLab keeps it so).
//
// It runs the rerouted binary beside it (or on $PATH, or --rerouted PATH).
package main

import (
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

var usage = `usage: rerouted-lab COMMAND [FLAGS]

  demo                show the problem and the fix in network namespaces
  bench [--record BENCHMARKS.md]
                      measure rerouted against the limit and MASQUERADE
  help                this text

Both need root and run the rerouted binary beside this one (or on $PATH;
--rerouted PATH names another).
'COMMAND --help' lists a command's flags.
`

// Exit codes, as rerouted's.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(exitUsage)
	}
	cmd, args := os.Args[1], os.Args[2:]
	var code int
	switch cmd {
	case "demo":
		code = cmdDemo(args)
	case "bench":
		code = cmdBench(args)
	case "bench-client": // the bench's helper process
		code = cmdBenchClient(args)
	case "bench-busy": // the bench's busy host
		code = cmdBenchBusy(args)
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "rerouted-lab: unknown command %q\n%s", cmd, usage)
		code = exitUsage
	}
	os.Exit(code)
}

// flags parses a subcommand's flags; it exits on --help or a bad flag.
func flags(name string, args []string, define func(*flag.FlagSet)) {
	fs := flag.NewFlagSet("rerouted-lab "+name, flag.ExitOnError)
	define(fs)
	fs.Parse(args)
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "rerouted-lab %s: unexpected argument %q\n", name, fs.Arg(0))
		os.Exit(exitUsage)
	}
}

// daemonFlag defines --rerouted, the daemon binary the world runs.
func daemonFlag(fs *flag.FlagSet, bin *string) {
	fs.StringVar(bin, "rerouted", "", "the rerouted binary to run (default: the one beside rerouted-lab, else rerouted on $PATH)")
}

// findDaemon is the rerouted binary to run: bin if given, else the one in
// this program's directory, else rerouted on $PATH.
func findDaemon(bin string) (string, error) {
	if bin != "" {
		return filepath.Abs(bin)
	}
	if self, err := os.Executable(); err == nil {
		beside := filepath.Join(filepath.Dir(self), "rerouted")
		if st, err := os.Stat(beside); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return beside, nil
		}
	}
	p, err := exec.LookPath("rerouted")
	if err != nil {
		return "", errors.New("no rerouted binary beside rerouted-lab or on $PATH: build it (go build -o bin/rerouted ./cmd/rerouted) or name it with --rerouted PATH")
	}
	return filepath.Abs(p)
}
