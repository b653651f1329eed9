package main

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/docgen"
)

var record = flag.Bool("record", false, "write docs/man/rerouted.8 and docs/man/rerouted.toml.5 (make man)")

// TestMain lets the tests run this binary as rerouted (REROUTED_TEST_MAIN=1).
func TestMain(m *testing.M) {
	if os.Getenv("REROUTED_TEST_MAIN") == "1" {
		main()
	}
	os.Exit(m.Run())
}

// commands is the usage text's commands, each with its flags as its
// --help prints them (help, which is the usage text, has none).
func commands(t *testing.T) []docgen.Command {
	t.Helper()
	cmds := docgen.ParseUsage(usage)
	if len(cmds) < 5 {
		t.Fatalf("found only %d commands in the usage text: %+v", len(cmds), cmds)
	}
	for i, c := range cmds {
		if c.Name == "help" {
			continue
		}
		cmd := exec.Command(os.Args[0], c.Name, "--help")
		cmd.Env = append(os.Environ(), "REROUTED_TEST_MAIN=1")
		b, _ := cmd.CombinedOutput() // --help exits 0 (flag.ExitOnError)
		if !strings.Contains(string(b), "Usage of rerouted "+c.Name) {
			t.Fatalf("rerouted %s --help: %s", c.Name, b)
		}
		cmds[i].Help = docgen.ParseHelp(string(b))
	}
	return cmds
}

// commandFlags is each command's flags ("--config"...), from its --help.
func commandFlags(t *testing.T) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, c := range commands(t) {
		var fs []string
		for _, f := range c.Help {
			fs = append(fs, "--"+f.Name)
		}
		out[c.Name] = fs
	}
	return out
}

// The bash completion offers every command and exactly each command's
// flags; rerouted(8) has an entry for each command and names each flag
// in the command's own OPTIONS subsection.
func TestCompletionAndManPageCurrent(t *testing.T) {
	flags := commandFlags(t)
	comp, err := os.ReadFile("../../packaging/bash_completion")
	if err != nil {
		t.Fatal(err)
	}
	man, err := os.ReadFile("../../docs/man/rerouted.8")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`compgen -W "([a-z ]+)" -- "\$cur"\)\)\n\t\treturn`).FindSubmatch(comp)
	if m == nil {
		t.Fatal("bash_completion: no list of commands")
	}
	commands := strings.Fields(string(m[1]))
	_, options, _ := bytes.Cut(man, []byte("\n.SH OPTIONS"))
	for c, fs := range flags {
		if !slices.Contains(commands, c) {
			t.Errorf("bash_completion does not offer %q", c)
		}
		if !regexp.MustCompile(`(?m)^\.B ` + c + `$`).Match(man) {
			t.Errorf("rerouted.8 has no .B %s entry under COMMANDS", c)
		}
		if !regexp.MustCompile(`(?m)^\.B rerouted ` + c + `$`).Match(man) {
			t.Errorf("rerouted.8 has no .B rerouted %s line under SYNOPSIS", c)
		}
		if c == "help" {
			continue
		}
		line := regexp.MustCompile(`(?m)^\t` + c + `\) flags="([^"]*)" ;;$`).FindSubmatch(comp)
		var got []string
		if line != nil {
			got = strings.Fields(string(line[1]))
		}
		slices.Sort(got)
		slices.Sort(fs)
		if !slices.Equal(got, fs) && (len(fs) > 0 || line != nil) {
			t.Errorf("bash_completion offers %s %v; its flags are %v", c, got, fs)
		}
		_, sub, _ := bytes.Cut(options, []byte("\n.SS "+c+"\n"))
		sub, _, _ = bytes.Cut(sub, []byte("\n.S"))
		for _, f := range fs {
			if !bytes.Contains(sub, []byte(`\fB`+strings.ReplaceAll(f, "-", `\-`)+`\fR`)) {
				t.Errorf("rerouted.8 does not name %s %s under OPTIONS, .SS %s", c, f, c)
			}
		}
	}
}

// The committed manual pages are what docgen makes of their sources now:
// rerouted.toml(5) of docs/configuration.md, rerouted(8) of the usage
// text, the commands' flags and docs/man/rerouted.8.md. With -record
// (make man) it writes them instead.
func TestManPagesCurrent(t *testing.T) {
	read := func(name string) []byte {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	man8, err := docgen.Rerouted8(read("../../docs/man/rerouted.8.md"), commands(t))
	if err != nil {
		t.Fatal(err)
	}
	pages := []struct {
		file, sources string
		roff          []byte
	}{
		{"../../docs/man/rerouted.8", "the usage text in cmd/rerouted/main.go, the commands' flags and docs/man/rerouted.8.md", man8},
		{"../../docs/man/rerouted.toml.5", "docs/configuration.md", docgen.TOML5(read("../../docs/configuration.md"))},
	}
	for _, p := range pages {
		if *record {
			if err := os.WriteFile(p.file, p.roff, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		if got := read(p.file); !bytes.Equal(got, p.roff) {
			t.Errorf("%s is not what make man generates from %s now (run make man): %s",
				strings.TrimPrefix(p.file, "../../"), p.sources, firstDiff(got, p.roff))
		}
	}
}

// firstDiff names the first line where the committed page and the
// generated one differ.
func firstDiff(got, want []byte) string {
	g, w := strings.Split(string(got), "\n"), strings.Split(string(want), "\n")
	for i := 0; i < len(g) || i < len(w); i++ {
		var gl, wl string
		if i < len(g) {
			gl = g[i]
		}
		if i < len(w) {
			wl = w[i]
		}
		if gl != wl {
			return fmt.Sprintf("line %d is %q, generated %q", i+1, gl, wl)
		}
	}
	return "they differ"
}
