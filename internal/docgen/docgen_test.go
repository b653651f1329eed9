package docgen

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestMarkdown(t *testing.T) {
	md := "# Title\n\nA `--flag` and **bold**, *it*, [a link](x.md).\n.dot\n\n## Keys\n\n| key | type | meaning |\n|---|---|---|\n| `a-b` | int | the thing |\n\n- `term`: said\n- plain – item\n  more\n\n```\n.x \\y\n```\n"
	want := ".PP\nA \\fB\\-\\-flag\\fR and \\fBbold\\fR, \\fIit\\fR, a link.\n\\&.dot\n.SH KEYS\n.TP\n\\fBa\\-b\\fR\nThe thing.\n.br\nType: int.\n.TP\n\\fBterm\\fR\nsaid\n.IP \\(bu 2\nplain \\(en item more\n.PP\n.RS 4\n.nf\n\\&.x \\ey\n.fi\n.RE\n"
	if got := Markdown([]byte(md), 0); got != want {
		t.Errorf("Markdown:\n%s\nwant:\n%s", got, want)
	}
}

func TestParseUsage(t *testing.T) {
	u := "usage: x\n\n  run [--config FILE] [--debug[=KINDS]]\n                      run it\n                      in front\n  demo                show it\n\n--config FILE defaults to y.\n"
	cs := ParseUsage(u)
	if len(cs) != 2 || cs[0].Name != "run" || cs[0].Synopsis != "[--config FILE] [--debug[=KINDS]]" || cs[0].Text != "run it in front" ||
		cs[1].Name != "demo" || cs[1].Synopsis != "" || cs[1].Text != "show it" {
		t.Errorf("ParseUsage: %+v", cs)
	}
}

// docs/layout.md names every directory of the repository that holds Go
// source.
func TestLayoutNamesEveryPackage(t *testing.T) {
	b, err := os.ReadFile("../../docs/layout.md")
	if err != nil {
		t.Fatal(err)
	}
	dirs := map[string]bool{}
	err = filepath.WalkDir("../..", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (strings.HasPrefix(d.Name(), ".") && p != "../.." || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(p, ".go") {
			dirs[filepath.ToSlash(strings.TrimPrefix(filepath.Dir(p), "../../"))] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for d := range dirs {
		if !strings.Contains(string(b), "`"+d+"`") {
			t.Errorf("docs/layout.md does not name `%s`", d)
		}
	}
}
