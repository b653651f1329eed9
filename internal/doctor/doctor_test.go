package doctor

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/policy"
)

// The kernel filters by the larger of conf.all.rp_filter and the
// interface's: a strict "all" makes a loose interface strict, and a loose
// "all" makes a strict interface loose.
func TestRPFilterTakesAllIntoAccount(t *testing.T) {
	u := &policy.Uplink{Name: "isp-b", Interface: "hb"}
	for _, c := range []struct {
		all, dev string
		strict   bool
	}{
		{"0", "0", false}, {"1", "0", true}, {"0", "1", true}, {"2", "1", false}, {"1", "2", false}, {"1", "1", true},
	} {
		sys := t.TempDir()
		for dev, v := range map[string]string{"all": c.all, "hb": c.dev} {
			dir := filepath.Join(sys, "net/ipv4/conf", dev)
			if err := os.MkdirAll(dir, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "rp_filter"), []byte(v+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		r := &Report{}
		checkRPFilter(r, u, Options{ProcSys: sys})
		var b strings.Builder
		r.Print(&b)
		values := "(all=" + c.all + ", hb=" + c.dev + ")"
		if got := len(r.Findings) == 1; got != c.strict || !strings.Contains(b.String(), values) {
			t.Errorf("all=%s hb=%s: strict %v, want %v, with %q:\n%s", c.all, c.dev, got, c.strict, values, b.String())
		}
	}
}

// A kernel without connect-time steering (Linux < 5.14, no cgroup v2) falls
// back to the queue, as documented: a note under the default, a problem
// when the file asks for steering = "connect" explicitly, nothing at all
// under steering = "queue".
func TestSteeringFallbackNoteOrProblem(t *testing.T) {
	unavailable := func(*policy.Config) (string, error) {
		return "", errors.New("no cgroup v2 mount")
	}
	available := func(*policy.Config) (string, error) { return "/sys/fs/cgroup", nil }
	const uplink = "[[uplink]]\nname = \"isp-b\"\nmark = 100\n"
	for _, c := range []struct {
		name, daemon        string
		probe               func(*policy.Config) (string, error)
		ok, notes, findings int
		wantLine            string
	}{
		{"default, unavailable", "", unavailable, 0, 1, 0, "NOTE     connect-time steering (the default"},
		{"explicit, unavailable", "[daemon]\nsteering = \"connect\"\n", unavailable, 0, 0, 1, "PROBLEM  steering = \"connect\" cannot work here: no cgroup v2 mount"},
		{"queue, unavailable", "[daemon]\nsteering = \"queue\"\n", unavailable, 0, 0, 0, ""},
		{"default, available", "", available, 1, 0, 0, "ok       steering = \"connect\""},
		{"explicit, available", "[daemon]\nsteering = \"connect\"\n", available, 1, 0, 0, "ok       steering = \"connect\""},
	} {
		cfg, err := policy.Parse("t.toml", []byte(c.daemon+uplink))
		if err != nil {
			t.Fatal(err)
		}
		r := &Report{}
		checkSteering(r, cfg, c.probe)
		var b strings.Builder
		r.Print(&b)
		if len(r.OK) != c.ok || len(r.Notes) != c.notes || len(r.Findings) != c.findings || !strings.Contains(b.String(), c.wantLine) {
			t.Errorf("%s: %d ok, %d notes, %d findings, want %d, %d, %d, with %q:\n%s",
				c.name, len(r.OK), len(r.Notes), len(r.Findings), c.ok, c.notes, c.findings, c.wantLine, b.String())
		}
	}
}
