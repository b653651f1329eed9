package policy

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// FuzzParse: no configuration file crashes the parser, and every error it
// reports points into the file (FILE:LINE:COL with a line the file has).
func FuzzParse(f *testing.F) {
	f.Add([]byte(good))
	examples, _ := filepath.Glob("../../examples/*.toml")
	for _, e := range examples {
		if b, err := os.ReadFile(e); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("[[rule]]\nuplink = \"b\"\ndport = \"1-65536\"\n"))
	f.Fuzz(func(t *testing.T, src []byte) {
		cfg, err := Parse("fuzz.toml", src)
		if err == nil {
			if cfg == nil {
				t.Fatal("no config and no error")
			}
			return
		}
		var es Errors
		if !errors.As(err, &es) {
			return // a read or syntax error from the TOML library, reported whole
		}
		lines := bytes.Count(src, []byte("\n")) + 1
		for _, e := range es {
			if e.File != "fuzz.toml" || e.Line < 1 || e.Line > lines || e.Col < 1 {
				t.Fatalf("error %q points outside the file (%d lines)", e.Error(), lines)
			}
		}
	})
}
