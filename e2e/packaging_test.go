package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The systemd unit is valid (systemd-analyze verify, with the binary under
// test in place of /usr/local/bin/rerouted) and keeps the settings the
// daemon relies on: readiness by notification, restarts after SIGUSR2's
// exit status 75, reload by SIGHUP.
func TestSystemdUnit(t *testing.T) {
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Fatal("systemd-analyze is not installed (.ci/run installs it)")
	}
	b, err := os.ReadFile("../examples/rerouted.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	for _, want := range []string{"Type=notify\n", "NotifyAccess=main\n", "RestartForceExitStatus=75\n",
		"ExecReload=/bin/kill -HUP $MAINPID\n", "KillSignal=SIGTERM\n", "CapabilityBoundingSet=CAP_NET_ADMIN "} {
		if !strings.Contains(unit, want) {
			t.Errorf("the unit lacks %q", strings.TrimSpace(want))
		}
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "rerouted.service")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(unit, "/usr/local/bin/rerouted", bin)), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("systemd-analyze", "verify", path).CombinedOutput(); err != nil || len(out) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}
