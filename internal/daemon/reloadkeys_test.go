package daemon

import (
	"bytes"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/policy"
)

func parse(t *testing.T, src string) *policy.Config {
	t.Helper()
	cfg, err := policy.Parse("t.toml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

const reloadBase = `[daemon]
queue = 3
[[uplink]]
name = "isp-b"
mark = 100
interface = "lo"
[uplink.health]
targets = ["192.0.2.53"]
interval = "2s"
[[uplink]]
name = "isp-c"
mark = 200
[[rule]]
name = "web"
uplink = "isp-b"
dport = [80]
`

func TestRestartKeys(t *testing.T) {
	old := parse(t, reloadBase)
	for _, c := range []struct {
		name, from, to string
		want           []string
	}{
		{"rules and marks apply at once", "dport = [80]", "dport = [443]", nil},
		{"a mark", "mark = 200", "mark = 201", nil},
		{"steering written as its default", "queue = 3", "queue = 3\nsteering = \"connect\"", nil},
		{"a [daemon] key", "queue = 3", "queue = 4\nidle_timeout = \"60s\"", []string{"daemon.queue", "daemon.idle_timeout"}},
		{"a health key", `interval = "2s"`, `interval = "5s"`, []string{`uplink "isp-b" health.interval`}},
		{"health targets", `targets = ["192.0.2.53"]`, `targets = ["192.0.2.54"]`, []string{`uplink "isp-b" health.targets`}},
		{"health removed", "[uplink.health]\ntargets = [\"192.0.2.53\"]\ninterval = \"2s\"\n", "", []string{`uplink "isp-b" [uplink.health]`}},
		{"an interface", `interface = "lo"`, `interface = "eth9"`, []string{`uplink "isp-b" interface`}},
		{"an uplink with health added", "[[rule]]", "[[uplink]]\nname = \"isp-d\"\nmark = 300\ninterface = \"lo\"\n[uplink.health]\ntargets = [\"192.0.2.1\"]\n[[rule]]",
			[]string{`uplink "isp-d" (added, with [uplink.health] or managed routing)`}},
		{"a plain uplink added", "[[rule]]", "[[uplink]]\nname = \"isp-d\"\nmark = 300\n[[rule]]", nil},
	} {
		if !strings.Contains(reloadBase, c.from) {
			t.Fatalf("%s: %q is not in the base", c.name, c.from)
		}
		got := restartKeys(old, parse(t, strings.Replace(reloadBase, c.from, c.to, 1)))
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: %q, want %q", c.name, got, c.want)
		}
	}
}

// Every [daemon] setting is compared: a field added to policy.Daemon and
// forgotten here would be silently kept by a reload.
func TestRestartKeysCoverEveryDaemonField(t *testing.T) {
	old := parse(t, "")
	typ := reflect.TypeOf(old.Daemon)
	for i := range typ.NumField() {
		name := typ.Field(i).Name
		if name == "SteeringSet" { // where the value came from, not a setting
			continue
		}
		cfg := parse(t, "")
		f := reflect.ValueOf(&cfg.Daemon).Elem().Field(i)
		switch f.Kind() {
		case reflect.Bool:
			f.SetBool(!f.Bool())
		case reflect.String:
			f.SetString(f.String() + "x")
		case reflect.Int, reflect.Int64:
			f.SetInt(f.Int() + 1)
		case reflect.Uint16, reflect.Uint32:
			f.SetUint(f.Uint() + 1)
		default:
			t.Fatalf("Daemon.%s: kind %s: teach this test", name, f.Kind())
		}
		if keys := restartKeys(old, cfg); len(keys) != 1 || !strings.HasPrefix(keys[0], "daemon.") {
			t.Errorf("Daemon.%s changed: %q, want one daemon key", name, keys)
		}
	}
}

// A reload that changes a start-only key is refused, naming the keys, and
// the running configuration stays whole (not the new rules with the old
// [daemon] values).
func TestReloadRefusesStartOnlyChanges(t *testing.T) {
	file := filepath.Join(t.TempDir(), "rerouted.toml")
	if err := os.WriteFile(file, []byte(reloadBase), 0o600); err != nil {
		t.Fatal(err)
	}
	old, err := policy.Load(file)
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	d := &Daemon{log: slog.New(slog.NewTextHandler(&logs, nil)), insecure: true}
	d.cfg.Store(old)
	changed := strings.Replace(strings.Replace(reloadBase, "queue = 3", "queue = 4", 1), "dport = [80]", "dport = [443]", 1)
	changed = strings.Replace(changed, `interval = "2s"`, `interval = "3s"`, 1)
	if err := os.WriteFile(file, []byte(changed), 0o600); err != nil {
		t.Fatal(err)
	}
	d.reload()
	if d.cfg.Load() != old {
		t.Error("the configuration was replaced")
	}
	out := logs.String()
	for _, w := range []string{"level=ERROR", "reload rejected: changed keys take effect only at a start",
		`keys="daemon.queue, uplink \"isp-b\" health.interval"`, "the current policy stays in force"} {
		if !strings.Contains(out, w) {
			t.Errorf("log lacks %q:\n%s", w, out)
		}
	}
}
