package doctor

import (
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
