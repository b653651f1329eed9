package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
)

// Set by the Makefile with -ldflags -X. version is `git describe --tags
// --always --dirty`; empty in a plain go build, which falls back to the
// main module's version in the build info. commit and modified are git's
// answers, used only where the build info has no VCS stamp: go build does
// not stamp a git worktree (its .git is a file), nor under -buildvcs=false.
var (
	version  string
	commit   string
	modified string
)

// cmdVersion prints the version, the commit and the Go version.
func cmdVersion(args []string) int {
	flags("version", args, func(*flag.FlagSet) {})
	bi, _ := debug.ReadBuildInfo()
	printVersion(os.Stdout, linked{version, commit, modified == "true"}, bi)
	return exitOK
}

// linked is what the Makefile set at link time.
type linked struct {
	version, commit string
	modified        bool
}

// printVersion writes
//
//	rerouted VERSION
//	commit REVISION[ (modified)]
//	go GOVERSION
//
// from the version set at link time, else the module's, and the build
// info's VCS stamp, else the commit set at link time ("unknown" where
// neither says: go run, a build outside git).
func printVersion(w io.Writer, l linked, bi *debug.BuildInfo) {
	v, commit, modified, goVersion := l.version, "", false, ""
	if bi != nil {
		if v == "" {
			v = bi.Main.Version
		}
		goVersion = bi.GoVersion
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				commit = s.Value
			case "vcs.modified":
				modified = s.Value == "true"
			}
		}
	}
	if commit == "" {
		commit, modified = l.commit, l.modified
	}
	if v == "" {
		v = "unknown"
	}
	if commit == "" {
		commit = "unknown"
	} else if modified {
		commit += " (modified)"
	}
	if goVersion == "" {
		goVersion = "unknown"
	}
	fmt.Fprintf(w, "rerouted %s\ncommit %s\ngo %s\n", v, commit, goVersion)
}
