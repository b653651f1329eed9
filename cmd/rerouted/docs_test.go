package main

import (
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestMain lets the tests run this binary as rerouted (REROUTED_TEST_MAIN=1).
func TestMain(m *testing.M) {
	if os.Getenv("REROUTED_TEST_MAIN") == "1" {
		main()
	}
	os.Exit(m.Run())
}

// commandFlags is each command's flags, as its --help prints them.
func commandFlags(t *testing.T) map[string][]string {
	t.Helper()
	flagRE := regexp.MustCompile(`(?m)^  -([a-z0-9-]+)`)
	out := map[string][]string{}
	for _, c := range []string{"run", "check", "doctor", "flows", "uplinks", "explain", "version"} {
		cmd := exec.Command(os.Args[0], c, "--help")
		cmd.Env = append(os.Environ(), "REROUTED_TEST_MAIN=1")
		b, _ := cmd.CombinedOutput() // --help exits 0 (flag.ExitOnError)
		if !strings.Contains(string(b), "Usage of rerouted "+c) {
			t.Fatalf("rerouted %s --help: %s", c, b)
		}
		var fs []string
		for _, m := range flagRE.FindAllStringSubmatch(string(b), -1) {
			fs = append(fs, "--"+m[1])
		}
		out[c] = fs
	}
	return out
}

// The bash completion offers every command and exactly each command's
// flags, and the man page names them all: both are written by hand, and
// this keeps them current.
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
	for c, fs := range flags {
		if !slices.Contains(commands, c) {
			t.Errorf("bash_completion does not offer %q", c)
		}
		if !strings.Contains(usage, "\n  "+c+" ") {
			t.Errorf("usage does not list %q", c)
		}
		if !regexp.MustCompile(`(?m)^\.B ` + c + `$`).Match(man) {
			t.Errorf("rerouted.8 has no .B %s entry", c)
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
		for _, f := range fs {
			if !strings.Contains(string(man), strings.ReplaceAll(f, "-", `\-`)) {
				t.Errorf("rerouted.8 does not name %s %s", c, f)
			}
		}
	}
}
