package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
)

// A configuration file users other than root can change: run refuses it
// (exit 2, nothing installed) unless given --insecure-config, and then
// warns; check refuses it the same way; doctor reports it with its fix.
func TestInsecureConfig(t *testing.T) {
	worldtest.Require(t) // its subtests need root: without it the test must skip, not pass
	for _, c := range []struct {
		name    string
		breakIt func(e *env) error
		want    func(e *env) []string // in every message about it
	}{
		{"owner", func(e *env) error { return os.Chown(e.cfg, 4321, 4321) },
			func(e *env) []string {
				return []string{"configuration file " + e.cfg, "owned by uid 4321, not root", "chown root:root " + e.cfg + " && chmod 0600 " + e.cfg}
			}},
		{"mode", func(e *env) error { return os.Chmod(e.cfg, 0o666) },
			func(e *env) []string {
				return []string{"configuration file " + e.cfg, "mode 0666: others can write it", "chown root:root " + e.cfg + " && chmod 0600 " + e.cfg}
			}},
		{"directory", func(e *env) error {
			// A directory of its own: the control socket's stays safe
			// (the daemon refuses to make its socket in an open one).
			d := filepath.Join(e.dir, "conf")
			if err := os.Mkdir(d, 0o700); err != nil {
				return err
			}
			cfg := filepath.Join(d, "rerouted.toml")
			if err := os.Rename(e.cfg, cfg); err != nil {
				return err
			}
			e.cfg = cfg
			return os.Chmod(d, 0o777)
		},
			func(e *env) []string {
				d := filepath.Dir(e.cfg)
				return []string{"configuration file " + e.cfg, "directory " + d + " has mode 0777", "chmod go-w " + d}
			}},
	} {
		t.Run(c.name, func(t *testing.T) {
			e := newEnv(t, "kernel", webRule)
			if err := c.breakIt(e); err != nil {
				t.Fatal(err)
			}
			want := c.want(e)
			has := func(what, out string, more ...string) {
				t.Helper()
				for _, w := range append(append([]string(nil), want...), more...) {
					if !strings.Contains(out, w) {
						t.Errorf("%s: no %q in:\n%s", what, w, out)
					}
				}
			}

			// run: refused before anything is installed.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			cmd := e.w.Host.Command(bin, "run", "--config", e.cfg, "--debug")
			cmd = exec.CommandContext(ctx, cmd.Path, cmd.Args[1:]...)
			out, err := cmd.CombinedOutput()
			if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
				t.Fatalf("run: %v, want exit 2:\n%s", err, out)
			}
			has("run", string(out), "level=ERROR", "refusing to run with a configuration file users other than root can change", "--insecure-config")
			if got := tables(t, e.w.Host); strings.Contains(got, "inet rerouted") {
				t.Errorf("run refused, yet the host has: %s", got)
			}
			if _, err := os.Stat(e.sock); !os.IsNotExist(err) {
				t.Errorf("run refused, yet made its control socket (%v)", err)
			}

			// check: the same, and --insecure-config makes it a warning.
			stderr, code := runBin(t, "check", "--config", e.cfg)
			if code != 2 {
				t.Errorf("check: exit %d, want 2:\n%s", code, stderr)
			}
			has("check", stderr, "--insecure-config")
			stderr, code = runBin(t, "check", "--insecure-config", "--config", e.cfg)
			if code != 0 {
				t.Errorf("check --insecure-config: exit %d, want 0:\n%s", code, stderr)
			}
			has("check --insecure-config", stderr, "WARNING")

			// doctor: a finding with its fix.
			dout, code := e.doctor()
			if code != 1 {
				t.Errorf("doctor: exit %d, want 1", code)
			}
			has("doctor", dout, "PROBLEM  configuration file "+e.cfg, "fix: ", "1 problem(s) found")

			// run --insecure-config: warns, then runs as usual.
			d, err := e.w.StartDaemonEnv(bin, e.cfg, nil, nil, "--debug", "--insecure-config")
			if err != nil {
				t.Fatal(err)
			}
			e.d = d
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("rerouted output:\n%s", d.Output())
				}
				d.Kill()
			})
			if err := d.WaitReady(); err != nil {
				t.Fatalf("%v\n%s", err, d.Output())
			}
			line, err := d.WaitFor("WARNING", time.Second)
			if err != nil {
				t.Fatal(err)
			}
			has("run --insecure-config", line, "level=WARN", "WARNING: running with a configuration file users other than root can change (--insecure-config)")
			if got := tables(t, e.w.Host); !strings.Contains(got, "table inet rerouted") {
				t.Errorf("run --insecure-config: no table inet rerouted in %q", got)
			}
			if peer, err := e.w.Fetch(80, 5*time.Second); err != nil || peer.Addr() != networld.HostB {
				t.Errorf("run --insecure-config: the server saw %v (%v), want %v", peer, err, networld.HostB)
			}
			if err := d.Stop(); err != nil {
				t.Errorf("stop: %v\n%s", err, d.Output())
			}
		})
	}
}
