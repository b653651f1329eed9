package daemon

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

var metricName = regexp.MustCompile(`^rerouted_[a-z0-9_]*[a-z0-9]$`)

// registeredMetrics reads the module's non-test Go source under dirs and
// returns every rerouted_ metric name it spells, with the label names
// written next to it: a prometheus.NewDesc's variable labels, a *Vec's
// labels, an Opts' ConstLabels.
func registeredMetrics(t *testing.T, dirs ...string) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	fset := token.NewFileSet()
	strs := func(e ast.Expr) []string {
		var ss []string
		switch e := e.(type) {
		case *ast.CompositeLit:
			for _, el := range e.Elts {
				if kv, ok := el.(*ast.KeyValueExpr); ok {
					el = kv.Key
				}
				if s := stringLit(el); s != "" {
					ss = append(ss, s)
				}
			}
		}
		return ss
	}
	for _, dir := range dirs {
		err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() || !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
				return err
			}
			f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
			if err != nil {
				return err
			}
			ast.Inspect(f, func(n ast.Node) bool {
				switch n := n.(type) {
				case *ast.BasicLit:
					if s := stringLit(n); metricName.MatchString(s) {
						if _, ok := out[s]; !ok {
							out[s] = nil
						}
					}
				case *ast.CallExpr:
					sel, ok := n.Fun.(*ast.SelectorExpr)
					if !ok || len(n.Args) < 2 {
						return true
					}
					switch {
					case sel.Sel.Name == "NewDesc" && len(n.Args) >= 3:
						if s := stringLit(n.Args[0]); metricName.MatchString(s) {
							out[s] = append(out[s], strs(n.Args[2])...)
						}
					case strings.HasSuffix(sel.Sel.Name, "Vec"):
						if s := optsName(n.Args[0]); s != "" {
							out[s] = append(out[s], strs(n.Args[1])...)
						}
					}
				case *ast.CompositeLit:
					if s := optsName(n); s != "" {
						for _, el := range n.Elts {
							if kv, ok := el.(*ast.KeyValueExpr); ok && isIdent(kv.Key, "ConstLabels") {
								out[s] = append(out[s], strs(kv.Value)...)
							}
						}
					}
				}
				return true
			})
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	return out
}

func stringLit(e ast.Expr) string {
	if l, ok := e.(*ast.BasicLit); ok && l.Kind == token.STRING {
		s, _ := strconv.Unquote(l.Value)
		return s
	}
	return ""
}

func isIdent(e ast.Expr, name string) bool {
	id, ok := e.(*ast.Ident)
	return ok && id.Name == name
}

// optsName is the Name of a prometheus ...Opts literal, if a metric's.
func optsName(e ast.Expr) string {
	cl, ok := e.(*ast.CompositeLit)
	if !ok {
		return ""
	}
	for _, el := range cl.Elts {
		if kv, ok := el.(*ast.KeyValueExpr); ok && isIdent(kv.Key, "Name") {
			if s := stringLit(kv.Value); metricName.MatchString(s) {
				return s
			}
		}
	}
	return ""
}

// Every metric the daemon registers has a row in the metrics reference of
// docs/operations.md, whose labels cell names each of its labels; and
// every metric the reference lists is one the daemon registers.
func TestMetricsReferenceComplete(t *testing.T) {
	metrics := registeredMetrics(t, "..", "../../cmd")
	if len(metrics) < 20 {
		t.Fatalf("found only %d metrics in the source: %v", len(metrics), metrics)
	}
	b, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	_, ref, ok := strings.Cut(string(b), "\n## Metrics\n")
	if !ok {
		t.Fatal("docs/operations.md has no \"## Metrics\" section")
	}
	ref, _, _ = strings.Cut(ref, "\n## ")
	row := regexp.MustCompile("(?m)^\\| `(rerouted_[a-z0-9_]+)` \\|([^|]*)\\|([^|]*)\\|")
	documented := map[string]string{}
	for _, m := range row.FindAllStringSubmatch(ref, -1) {
		documented[m[1]] = m[3]
		if _, ok := metrics[m[1]]; !ok {
			t.Errorf("docs/operations.md lists %s, which the daemon does not register", m[1])
		}
	}
	for name, labels := range metrics {
		cell, ok := documented[name]
		if !ok {
			t.Errorf("docs/operations.md, Metrics: %s has no row (| `%s` | type | labels | meaning | alert on |)", name, name)
			continue
		}
		slices.Sort(labels)
		for _, l := range slices.Compact(labels) {
			if !strings.Contains(cell, "`"+l+"`") {
				t.Errorf("docs/operations.md, Metrics: the labels of %s do not name `%s` (they say %q)", name, l, cell)
			}
		}
	}
}

// The "reload" column of docs/configuration.md says what a reload does
// with a change to each key: "restart" where restartKeys refuses it,
// "yes" where it is applied.
func TestConfigurationReloadColumn(t *testing.T) {
	b, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	reload := map[string]string{} // "daemon.queue": "restart"
	section := ""
	tables := map[string]string{"## [daemon]": "daemon", "## [[uplink]]": "uplink", "## [uplink.health]": "health", "## [[rule]]": "rule", "## [usage]": "usage"}
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "## ") {
			section = tables[l]
			continue
		}
		if c := strings.Split(l, " | "); section != "" && strings.HasPrefix(l, "| `") && len(c) == 5 {
			reload[section+"."+strings.Trim(c[0], "|` ")] = c[3]
		}
	}
	plain := "[[uplink]]\nname = \"b\"\nmark = 1\ninterface = \"eth1\"\n%s\n[[uplink]]\nname = \"c\"\nmark = 2\n"
	managed := "[[uplink]]\nname = \"b\"\nmark = 1\ninterface = \"eth1\"\ngateway = \"192.0.2.1\"\ntable = 100\n%s\n[uplink.health]\ntargets = [\"192.0.2.53\"]\n%s\n"
	cases := map[string][2]string{ // key: the file before and after the change
		"daemon.queue":             {"", "[daemon]\nqueue = 5"},
		"daemon.queues":            {"[daemon]\nqueues = 62", "[daemon]\nqueues = 63"},
		"daemon.honor_marks":       {"", "[daemon]\nhonor_marks = false"},
		"daemon.control_socket":    {"", "[daemon]\ncontrol_socket = \"/run/x.sock\""},
		"daemon.metrics_listen":    {"", "[daemon]\nmetrics_listen = \"127.0.0.1:1\""},
		"daemon.gc_interval":       {"", "[daemon]\ngc_interval = \"5s\""},
		"daemon.idle_timeout":      {"", "[daemon]\nidle_timeout = \"60s\""},
		"daemon.datapath":          {"", "[daemon]\ndatapath = \"userspace\""},
		"daemon.on_failure":        {"", "[daemon]\non_failure = \"closed\""},
		"daemon.steering":          {"", "[daemon]\nsteering = \"queue\""},
		"daemon.host_marks":        {"", "[daemon]\nhost_marks = \"queue\""},
		"daemon.new_flows_per_uid": {"", "[daemon]\nnew_flows_per_uid = 5"},
		"uplink.name":              {fmt.Sprintf(plain, ""), strings.Replace(fmt.Sprintf(plain, ""), `"b"`, `"d"`, 1)},
		"uplink.mark":              {fmt.Sprintf(plain, ""), strings.Replace(fmt.Sprintf(plain, ""), "mark = 1", "mark = 3", 1)},
		"uplink.interface":         {fmt.Sprintf(plain, ""), strings.Replace(fmt.Sprintf(plain, ""), "eth1", "eth2", 1)},
		"uplink.fallback":          {fmt.Sprintf(plain, ""), fmt.Sprintf(plain, "fallback = \"c\"")},
		"uplink.reset_tcp":         {fmt.Sprintf(plain, ""), fmt.Sprintf(plain, "reset_tcp = false")},
		"uplink.gateway":           {fmt.Sprintf(managed, "", ""), strings.Replace(fmt.Sprintf(managed, "", ""), "192.0.2.1", "192.0.2.2", 1)},
		"uplink.gateway6":          {fmt.Sprintf(managed, "", ""), fmt.Sprintf(managed, "gateway6 = \"2001:db8::1\"", "")},
		"uplink.table":             {fmt.Sprintf(managed, "", ""), strings.Replace(fmt.Sprintf(managed, "", ""), "table = 100", "table = 101", 1)},
		"uplink.health":            {fmt.Sprintf(plain, ""), fmt.Sprintf(plain, "[uplink.health]\ntargets = [\"192.0.2.53\"]")},
		"health.targets":           {fmt.Sprintf(managed, "", ""), strings.Replace(fmt.Sprintf(managed, "", ""), "192.0.2.53", "192.0.2.54", 1)},
		"health.interval":          {fmt.Sprintf(managed, "", ""), fmt.Sprintf(managed, "", "interval = \"3s\"")},
		"health.timeout":           {fmt.Sprintf(managed, "", ""), fmt.Sprintf(managed, "", "timeout = \"500ms\"")},
		"health.down_after":        {fmt.Sprintf(managed, "", ""), fmt.Sprintf(managed, "", "down_after = 4")},
		"health.up_after":          {fmt.Sprintf(managed, "", ""), fmt.Sprintf(managed, "", "up_after = 3")},
		"uplink.standby":           {fmt.Sprintf(plain, ""), fmt.Sprintf(plain, "standby = true")},
		"uplink.quota":             {fmt.Sprintf(plain, ""), fmt.Sprintf(plain, "quota = \"5MB\"")},
		"uplink.quota_period":      {fmt.Sprintf(plain, "quota = \"5MB\""), fmt.Sprintf(plain, "quota = \"5MB\"\nquota_period = \"week\"")},
		"uplink.quota_reset":       {fmt.Sprintf(plain, "quota = \"5MB\""), fmt.Sprintf(plain, "quota = \"5MB\"\nquota_reset = 3")},
		"uplink.on_quota":          {fmt.Sprintf(plain, "quota = \"5MB\""), fmt.Sprintf(plain, "quota = \"5MB\"\non_quota = \"reset\"")},
		"usage.enabled":            {"", "[usage]\nenabled = false"},
		"usage.state":              {"", "[usage]\nstate = \"/tmp/u.json\""},
		"usage.interval":           {"", "[usage]\ninterval = \"9s\""},
		"usage.top":                {"", "[usage]\ntop = 3"},
	}
	for key, cell := range reload {
		if strings.HasPrefix(key, "rule.") {
			if cell != "yes" { // restartKeys reads no rule key
				t.Errorf("docs/configuration.md: %s: reload is %q; a reload applies every rule key (yes)", key, cell)
			}
			continue
		}
		c, ok := cases[key]
		if !ok {
			t.Errorf("docs/configuration.md documents %s, which this test cannot change (add a case)", key)
			continue
		}
		keys := restartKeys(parse(t, c[0]), parse(t, c[1]))
		if got := map[bool]string{true: "restart", false: "yes"}[len(keys) > 0]; got != cell {
			t.Errorf("docs/configuration.md: %s: reload is %q, but a reload of that change says %q (restart keys %q)", key, cell, got, keys)
		}
	}
	if len(reload) < len(cases) {
		t.Errorf("found the reload column of %d keys in docs/configuration.md, want at least %d", len(reload), len(cases))
	}
}
