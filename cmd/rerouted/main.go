// Command rerouted gives locally originated connections the source address of
// the uplink their fwmark routes them through, without conntrack.
//
// Its commands and flags are listed once, in usage below (rerouted help).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/rerouted/rerouted/internal/control"
	"github.com/rerouted/rerouted/internal/daemon"
	"github.com/rerouted/rerouted/internal/events"
	"github.com/rerouted/rerouted/internal/filesafety"
	"github.com/rerouted/rerouted/internal/instance"
	"github.com/rerouted/rerouted/internal/nftdp/nftfeat"
	"github.com/rerouted/rerouted/internal/policy"
	acct "github.com/rerouted/rerouted/internal/usage"
)

// defaultConfig is the configuration file every command that reads one
// uses without --config (a variable for the tests).
var defaultConfig = "/etc/rerouted/rerouted.toml"

// usage is the one list of commands and flags (rerouted help).
var usage = `usage: rerouted COMMAND [FLAGS]

  run [--config FILE] [--debug[=KINDS]] [--insecure-config]
                      run the daemon in the foreground
  check [--config FILE] [--insecure-config]
                      validate a configuration (exit 2 if invalid); run and check
                      refuse a file users other than root can change, unless given
                      --insecure-config
  doctor [--config FILE]
                      check the host for what breaks multi-ISP setups (exit 1 if any)
  flows [--config FILE] [--json]
                      list the running daemon's translated flows
  uplinks [--config FILE] [--json]
                      each uplink's state per family (up/down, since, why),
                      addresses, flows
  usage [--config FILE] [--by user|cgroup|exe|rule] [--uplink NAME] [--json]
                      what each owner sent and received on each uplink
  explain [--config FILE] --pid PID --dst ADDR:PORT [--protocol tcp|udp|icmp]
                      which rule a new connection from PID would match, and why
  version             version, commit and Go version of this binary
  help                print this list of commands

--config FILE defaults to ` + defaultConfig + `.
'COMMAND --help' lists a command's flags.
`

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2  // bad command line or invalid configuration
	exitRestart = 75 // stopped by SIGUSR2 for a restart (EX_TEMPFAIL; the unit restarts on it)
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(exitUsage)
	}
	cmd, args := os.Args[1], os.Args[2:]
	var code int
	switch cmd {
	case "run":
		code = cmdRun(args)
	case "check":
		code = cmdCheck(args)
	case "doctor":
		code = cmdDoctor(args)
	case "flows":
		code = cmdFlows(args)
	case "uplinks":
		code = cmdUplinks(args)
	case "usage":
		code = cmdUsage(args)
	case "explain":
		code = cmdExplain(args)
	case "version", "--version":
		code = cmdVersion(args)
	case "-h", "--help", "help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "rerouted: unknown command %q\n%s", cmd, usage)
		code = exitUsage
	}
	os.Exit(code)
}

// flags parses a subcommand's flags; it exits on --help or a bad flag.
func flags(name string, args []string, define func(*flag.FlagSet)) {
	fs := flag.NewFlagSet("rerouted "+name, flag.ExitOnError)
	define(fs)
	fs.Parse(args)
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "rerouted %s: unexpected argument %q\n", name, fs.Arg(0))
		os.Exit(exitUsage)
	}
}

// configFlag defines --config, defaultConfig unless given.
func configFlag(fs *flag.FlagSet, file *string, what string) {
	fs.StringVar(file, "config", defaultConfig, what)
}

// loadConfig loads and validates the file, printing FILE:LINE:COL errors.
func loadConfig(file string) (*policy.Config, int) {
	if msg := missingConfig(file); msg != "" {
		fmt.Fprintln(os.Stderr, msg)
		return nil, exitUsage
	}
	cfg, err := policy.Load(file)
	if err != nil {
		var es policy.Errors
		if errors.As(err, &es) {
			fmt.Fprintln(os.Stderr, es.Error())
		} else {
			fmt.Fprintf(os.Stderr, "rerouted: %v\n", err)
		}
		return nil, exitUsage
	}
	return cfg, exitOK
}

// missingConfig words the error for a configuration file that does not
// exist: for the default one, how to name another. "" if it exists (or
// fails otherwise: policy.Load says how).
func missingConfig(file string) string {
	if file == "" {
		return "rerouted: --config FILE: the file name is empty"
	}
	if _, err := os.Stat(file); !errors.Is(err, os.ErrNotExist) {
		return ""
	}
	if file == defaultConfig {
		return fmt.Sprintf("rerouted: %s does not exist (the default configuration file): create it, or name another with --config FILE", file)
	}
	return fmt.Sprintf("rerouted: --config %s: the file does not exist", file)
}

// insecureWarning words a filesafety.Check error for a warning: its fix,
// without the advice to pass --insecure-config, which was.
func insecureWarning(err error) string {
	var ie *filesafety.InsecureFileError
	if errors.As(err, &ie) {
		return ie.Problem() + "; fix: " + strings.Join(ie.Fixes, " && ")
	}
	return err.Error()
}

// insecureConfigFlag defines --insecure-config.
func insecureConfigFlag(fs *flag.FlagSet, v *bool) {
	fs.BoolVar(v, "insecure-config", false, "use a configuration file that users other than root can change (not root's, or writable by others, or in such a directory)")
}

func cmdCheck(args []string) int {
	var file string
	var insecure bool
	flags("check", args, func(fs *flag.FlagSet) {
		configFlag(fs, &file, "configuration file")
		insecureConfigFlag(fs, &insecure)
	})
	cfg, code := loadConfig(file)
	if cfg == nil {
		return code
	}
	// The daemon runs as root: a file another user can change would route
	// as that user says. run refuses it; so does check, to say so first.
	if err := filesafety.Check(file); err != nil {
		if !insecure {
			fmt.Fprintf(os.Stderr, "rerouted: %v\n", err)
			return exitUsage
		}
		fmt.Fprintf(os.Stderr, "rerouted: WARNING: using it anyway (--insecure-config): %s\n", insecureWarning(err))
	}
	fmt.Printf("%s: ok (%d uplinks, %d rules)\n", file, len(cfg.Uplinks), len(cfg.Rules))
	return exitOK
}

// debugFlag is --debug (every kind of event, and debug logs) or
// --debug=KIND,... (those kinds only).
type debugFlag struct{ kinds events.Kinds }

func (d *debugFlag) String() string { return "" }
func (d *debugFlag) Set(s string) error {
	k, err := events.ParseKinds(s)
	d.kinds = k
	return err
}

func cmdRun(args []string) int {
	var file string
	var debug debugFlag
	var insecure bool
	for i, a := range args { // a bare --debug means every kind
		if a == "--debug" || a == "-debug" {
			args[i] = "--debug=all"
		}
	}
	flags("run", args, func(fs *flag.FlagSet) {
		configFlag(fs, &file, "configuration file")
		fs.Var(&debug, "debug", "print the debug stream on standard output: every event, and debug logs; or only some kinds:\n"+
			"--debug=new,destroy,pass,move,refused,uplink,log (log: the DEBUG log lines)")
		insecureConfigFlag(fs, &insecure)
	})
	cfg, code := loadConfig(file)
	if cfg == nil {
		return code
	}
	level := slog.LevelInfo
	var stream io.Writer
	if debug.kinds != 0 {
		stream = os.Stdout
	}
	if debug.kinds&events.Log != 0 {
		level = slog.LevelDebug
	}
	log := newLogger(os.Stderr, level)
	// Before anything is installed: a root daemon must not take its rules
	// from a file another user can change.
	if err := filesafety.Check(file); err != nil {
		if !insecure {
			log.Error("refusing to run with a configuration file users other than root can change", "err", err)
			return exitUsage
		}
		log.Warn("WARNING: running with a configuration file users other than root can change (--insecure-config)", "err", insecureWarning(err))
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	// SIGUSR2: stop for a restart, leaving translations in place (exit 75).
	usr2 := make(chan os.Signal, 1)
	signal.Notify(usr2, syscall.SIGUSR2)
	detach := make(chan struct{})
	go func() { <-usr2; close(detach) }()
	reload := make(chan struct{}, 1)
	go func() {
		for range hup {
			select {
			case reload <- struct{}{}:
			default: // a reload is already pending
			}
		}
	}()
	notify := func(state string) {
		if err := sdNotify(state); err != nil {
			log.Warn("systemd notification", "state", state, "err", err)
		}
	}
	err := daemon.Run(ctx, daemon.Options{Config: cfg, Log: log, Events: stream, EventKinds: debug.kinds, Reload: reload, Notify: notify, Detach: detach,
		InsecureConfig: insecure})
	if errors.Is(err, daemon.ErrDetached) {
		log.Info("stopped for a restart; the next start adopts the flows")
		return exitRestart
	}
	var serr *acct.StateError
	if errors.Is(err, instance.ErrRunning) || errors.Is(err, instance.ErrInsecure) || errors.As(err, &serr) {
		// Refused before touching anything: as for a bad configuration.
		log.Error("rerouted refused to start; nothing was changed", "err", err)
		return exitUsage
	}
	var kerr *nftfeat.KernelError
	if errors.As(err, &kerr) {
		// Like a bad configuration: restarting cannot help. What the
		// start had installed is removed again.
		log.Error("rerouted cannot run on this kernel; nothing is installed", "err", err)
		return exitUsage
	}
	if err != nil {
		log.Error("rerouted failed", "err", err)
		return exitFailure
	}
	return exitOK
}

func cmdFlows(args []string) int {
	return listCmd("flows", args, control.QueryFlows,
		func(fs []control.FlowInfo) any { return control.FlowsReply{Flows: fs} },
		func(f control.FlowInfo) string { return f.String() }, "flows")
}

func cmdUplinks(args []string) int {
	return listCmd("uplinks", args, control.QueryUplinks,
		func(us []control.UplinkInfo) any { return control.UplinksReply{Uplinks: us} },
		func(u control.UplinkInfo) string { return fmt.Sprintf("%s flows %d", u.Status, u.Flows) }, "")
}

// listCmd asks the running daemon for a list (through the control socket
// the configuration names) and prints it, a line each or as JSON; count,
// if set, says on standard error how many there were.
func listCmd[T any](name string, args []string, ask func(string) ([]T, error), reply func([]T) any, line func(T) string, count string) int {
	var file string
	var asJSON bool
	flags(name, args, func(fs *flag.FlagSet) {
		configFlag(fs, &file, "configuration file (for the control socket's path)")
		fs.BoolVar(&asJSON, "json", false, fmt.Sprintf(`print {%q: [...]}`, name))
	})
	cfg, code := loadConfig(file)
	if cfg == nil {
		return code
	}
	items, err := ask(cfg.Daemon.ControlSocket)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rerouted: %v\n", err)
		return exitFailure
	}
	if asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(reply(items)); err != nil {
			fmt.Fprintf(os.Stderr, "rerouted: %v\n", err)
			return exitFailure
		}
		return exitOK
	}
	for _, it := range items {
		fmt.Println(line(it))
	}
	if count != "" {
		fmt.Fprintf(os.Stderr, "rerouted: %d %s\n", len(items), count)
	}
	return exitOK
}
