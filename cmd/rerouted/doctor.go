package main

import (
	"flag"
	"fmt"
	"os"

	"github.com/rerouted/rerouted/internal/control"
	"github.com/rerouted/rerouted/internal/doctor"
)

// cmdDoctor checks the host for what breaks multi-ISP setups. Exit 0: no
// problem found (notes, what works as documented but is worth knowing, do
// not count); 1: problems, each with its fix; 2: bad configuration.
func cmdDoctor(args []string) int {
	var file string
	flags("doctor", args, func(fs *flag.FlagSet) {
		configFlag(fs, &file, "configuration file")
	})
	cfg, code := loadConfig(file)
	if cfg == nil {
		return code
	}
	_, err := control.QueryFlows(cfg.Daemon.ControlSocket)
	r, err := doctor.Check(cfg, doctor.Options{DaemonRunning: err == nil})
	if err != nil {
		fmt.Fprintf(os.Stderr, "rerouted doctor: %v\n", err)
		return exitFailure
	}
	r.Print(os.Stdout)
	if len(r.Findings) > 0 {
		fmt.Printf("\n%d problem(s) found\n", len(r.Findings))
		return exitFailure
	}
	fmt.Println("\nno problem found")
	return exitOK
}
