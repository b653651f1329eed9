package usage

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestStateRoundTrip(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "usage.json")
	now := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	s, err := LoadState(path, now)
	if err != nil || len(s.Ended) != 0 || !s.Since.Equal(now) || s.Uplinks[0] != Default {
		t.Fatalf("a missing file: %+v, %v", s, err)
	}
	s.Uplinks = append(s.Uplinks, "isp-b")
	o := Owner{User: "root", Cgroup: "/", Exe: "/usr/bin/curl", Rule: "web"}
	s.add(rowKey{"isp-b", o}, Counts{BytesIn: 10, BytesOut: 20, PacketsIn: 1, PacketsOut: 2})
	s.add(rowKey{"isp-b", o}, Counts{BytesIn: 1, BytesOut: 2, PacketsIn: 1, PacketsOut: 1})
	s.Retiring = []uint64{7, 9}
	if err := s.Write(path); err != nil {
		t.Fatal(err)
	}
	if left, _ := filepath.Glob(filepath.Join(filepath.Dir(path), ".usage-*")); len(left) != 0 {
		t.Errorf("temporary files left: %v", left)
	}
	got, err := LoadState(path, now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if len(got.Ended) != 1 || got.Ended[0].Counts != (Counts{11, 22, 2, 3}) || !got.Since.Equal(now) || len(got.Retiring) != 2 {
		t.Errorf("read back %+v", got)
	}
}

// A state file that is not the daemon's alone, or not one at all, is
// refused with its path, the problem and what to do; never replaced.
func TestStateRefused(t *testing.T) {
	dir := t.TempDir()
	good := `{"version":1,"since":"2026-12-01T00:00:00Z","uplinks":["default"],"ended":[]}`
	for _, c := range []struct {
		name, content string
		mode          os.FileMode
		owner         int
		want          string
	}{
		{"corrupt", `{"version":1,"since":`, 0o600, -1, "corrupt"},
		{"unknown field", `{"version":1,"bytes":3}`, 0o600, -1, "corrupt"},
		{"version", `{"version":2,"since":"2026-12-01T00:00:00Z","uplinks":["default"]}`, 0o600, -1, "version 2"},
		{"no default", `{"version":1,"since":"2026-12-01T00:00:00Z","uplinks":["isp-b"]}`, 0o600, -1, "default"},
		{"writable", good, 0o666, -1, "writable by others"},
		{"foreign", good, 0o600, 4321, "owned by uid 4321"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.owner >= 0 && os.Geteuid() != 0 {
				t.Skip("chown needs root")
			}
			p := filepath.Join(dir, c.name+".json")
			if err := os.WriteFile(p, []byte(c.content), c.mode); err != nil {
				t.Fatal(err)
			}
			os.Chmod(p, c.mode)
			if c.owner >= 0 {
				if err := os.Chown(p, c.owner, c.owner); err != nil {
					t.Fatal(err)
				}
			}
			_, err := LoadState(p, time.Now())
			var se *StateError
			if !errors.As(err, &se) || !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want a StateError naming %s and %q", err, p, c.want)
			}
			if b, _ := os.ReadFile(p); string(b) != c.content {
				t.Errorf("the refused file was changed")
			}
		})
	}
}

// The metrics name owners as they appear, up to top per uplink and kind;
// the rest are "other", and each kind adds up to the uplink's total.
func TestCollectorTopN(t *testing.T) {
	r := Report{Uplinks: []string{Default, "isp-b"}}
	for i, u := range []string{"a", "b", "c", "d"} {
		r.Rows = append(r.Rows, Row{Uplink: "isp-b", Owner: Owner{User: u, Cgroup: "/", Exe: "/bin/" + u, Rule: NoRule}, Counts: Counts{BytesOut: uint64(100 * (i + 1))}})
	}
	c := NewCollector(func() (Report, bool) { return r, true }, 2)
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	want := map[string]float64{"a": 100, "b": 200, "other": 700}
	for name, v := range want {
		got := testutil.ToFloat64(gauge(t, reg, "isp-b", "user", name))
		if got != v {
			t.Errorf("user %s: %v, want %v", name, got, v)
		}
	}
	// A later owner stays "other", and the named ones stay named.
	r.Rows = append([]Row{{Uplink: "isp-b", Owner: Owner{User: "e"}, Counts: Counts{BytesOut: 5000}}}, r.Rows...)
	if got := testutil.ToFloat64(gauge(t, reg, "isp-b", "user", "other")); got != 5700 {
		t.Errorf("other: %v, want 5700", got)
	}
}

// gauge is one series of rerouted_owner_bytes_total (direction out), as
// a collector testutil can read.
func gauge(t *testing.T, reg *prometheus.Registry, uplink, kind, owner string) prometheus.Collector {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{Name: "x"})
	for _, mf := range mfs {
		if mf.GetName() != "rerouted_owner_bytes_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			l := map[string]string{}
			for _, lp := range m.GetLabel() {
				l[lp.GetName()] = lp.GetValue()
			}
			if l["uplink"] == uplink && l["owner_kind"] == kind && l["owner"] == owner && l["direction"] == "out" {
				g.Set(m.GetCounter().GetValue())
				return g
			}
		}
	}
	t.Fatalf("no series uplink=%s owner_kind=%s owner=%s", uplink, kind, owner)
	return nil
}
