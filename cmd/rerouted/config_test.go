package main

import (
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// captureOutput runs f with os.Stderr and os.Stdout sent to pipes and
// returns what it wrote to each.
func captureOutput(t *testing.T, f func() int) (code int, stdout, stderr string) {
	t.Helper()
	read := func(p **os.File) func() string {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		old := *p
		*p = w
		done := make(chan string)
		go func() { b, _ := io.ReadAll(r); done <- string(b) }()
		return func() string { *p = old; w.Close(); return <-done }
	}
	outDone, errDone := read(&os.Stdout), read(&os.Stderr)
	code = f()
	return code, outDone(), errDone()
}

// Every command that reads a configuration reads the default file without
// --config, and says so, naming it and --config, when it does not exist.
func TestDefaultConfigMissing(t *testing.T) {
	def := filepath.Join(t.TempDir(), "rerouted.toml")
	defer func(old string) { defaultConfig = old }(defaultConfig)
	defaultConfig = def
	for name, cmd := range map[string]func([]string) int{
		"run": cmdRun, "check": cmdCheck, "doctor": cmdDoctor,
		"flows": cmdFlows, "uplinks": cmdUplinks, "explain": cmdExplain,
	} {
		code, _, stderr := captureOutput(t, func() int { return cmd(nil) })
		if code != exitUsage {
			t.Errorf("%s: exit %d, want %d", name, code, exitUsage)
		}
		if !strings.Contains(stderr, def+" does not exist (the default configuration file)") || !strings.Contains(stderr, "--config FILE") {
			t.Errorf("%s: stderr %q: want the default's path and --config", name, stderr)
		}
		if strings.Contains(stderr, "required") {
			t.Errorf("%s: stderr %q still says --config is required", name, stderr)
		}
	}
}

// The default file is used when it exists; --config overrides it.
func TestDefaultConfigAndOverride(t *testing.T) {
	dir := t.TempDir()
	def, other := filepath.Join(dir, "rerouted.toml"), filepath.Join(dir, "other.toml")
	defer func(old string) { defaultConfig = old }(defaultConfig)
	defaultConfig = def
	if err := os.WriteFile(def, []byte("[[uplink]]\nname = \"isp-b\"\nmark = 100\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	// The temporary directory may be one others can write (/tmp's
	// parent): this test is about which file, not its safety.
	code, stdout, stderr := captureOutput(t, func() int { return cmdCheck([]string{"--insecure-config"}) })
	if code != exitOK || !strings.HasPrefix(stdout, def+": ok (1 uplinks, 0 rules)") {
		t.Errorf("check: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	code, _, stderr = captureOutput(t, func() int { return cmdCheck([]string{"--config", other}) })
	if code != exitUsage || !strings.Contains(stderr, "--config "+other+": the file does not exist") {
		t.Errorf("check --config %s: exit %d, stderr %q", other, code, stderr)
	}
	if err := os.WriteFile(other, []byte("[[uplink]]\nname = \"isp-b\"\nmark = 100\n[[uplink]]\nname = \"isp-c\"\nmark = 200\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, stdout, stderr = captureOutput(t, func() int { return cmdCheck([]string{"--insecure-config", "--config", other}) })
	if code != exitOK || !strings.HasPrefix(stdout, other+": ok (2 uplinks, 0 rules)") {
		t.Errorf("check --config %s: exit %d, stdout %q, stderr %q", other, code, stdout, stderr)
	}
}

// The usage text is the one list of the commands main dispatches.
func TestUsageListsEveryCommand(t *testing.T) {
	for _, c := range []string{"run", "check", "doctor", "flows", "uplinks", "explain", "version", "help"} {
		if !strings.Contains(usage, "\n  "+c+" ") {
			t.Errorf("usage does not list %q", c)
		}
	}
}
