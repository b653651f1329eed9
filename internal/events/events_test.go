package events

import (
	"strings"
	"testing"
)

func TestParseKinds(t *testing.T) {
	for _, c := range []struct {
		in   string
		want Kinds
		err  string
	}{
		{"all", All, ""},
		{"new,destroy", New | Destroy, ""},
		{" pass , log", Pass | Log, ""},
		{"uplink,move,refused", Uplink | Move | Refused, ""},
		{"new,bogus", 0, `unknown debug event kind "bogus"`},
		{"", 0, `unknown debug event kind ""`},
	} {
		got, err := ParseKinds(c.in)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%q: err %v, want %q", c.in, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("%q: %b, %v; want %b", c.in, got, err, c.want)
		}
	}
	var nilWriter *Writer
	if nilWriter.On(All) {
		t.Error("a nil writer prints")
	}
	if (&Writer{kinds: New}).On(Pass) {
		t.Error("a writer for new lines prints pass lines")
	}
}
