package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// publicDir is a directory every user may enter, removed at the end.
func publicDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "rerouted-e2e-public-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

// The control socket answers root only: its file mode is 0600, and even if
// someone widens it, the daemon checks the peer's credentials.
func TestControlSocketRefusesNonRoot(t *testing.T) {
	e := newEnv(t, "kernel", webRule)
	pub := publicDir(t)
	e.sock, e.cfg = filepath.Join(pub, "ctl.sock"), filepath.Join(pub, "rerouted.toml")
	e.writeConfig(webRule)
	os.Chmod(e.cfg, 0o644)
	e.start()
	if fi, err := os.Stat(e.sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket mode %v, err %v; want 0600", fi.Mode(), err)
	}
	if err := os.Chmod(e.sock, 0o666); err != nil { // an operator's mistake
		t.Fatal(err)
	}
	prog := filepath.Join(pub, "rerouted")
	if b, err := os.ReadFile(bin); err != nil || os.WriteFile(prog, b, 0o755) != nil {
		t.Fatalf("copy the binary: %v", err)
	}
	out, err := exec.Command("setpriv", "--reuid", "4321", "--regid", "4321", "--clear-groups", "--",
		prog, "flows", "--config", e.cfg).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "permission denied: the control socket answers root only") {
		t.Fatalf("uid 4321: rerouted flows printed %q, err %v; want a refusal", out, err)
	}
	if _, err := e.d.WaitFor("control socket: refused a client that is not root", 0); err != nil {
		t.Error(err)
	}
	if got := e.flows(); got == nil { // root still gets an answer
		t.Fatal("root's listing failed")
	}
}
