package daemon

import (
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
