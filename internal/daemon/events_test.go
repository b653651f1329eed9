package daemon

import (
	"strings"
	"testing"
)

func TestParseEventKinds(t *testing.T) {
	for _, c := range []struct {
		in   string
		want EventKinds
		err  string
	}{
		{"all", EventAll, ""},
		{"new,destroy", EventNew | EventDestroy, ""},
		{" pass , log", EventPass | EventLog, ""},
		{"uplink,move,refused", EventUplink | EventMove | EventRefused, ""},
		{"new,bogus", 0, `unknown debug event kind "bogus"`},
		{"", 0, `unknown debug event kind ""`},
	} {
		got, err := ParseEventKinds(c.in)
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
	var nilWriter *eventWriter
	if nilWriter.on(EventAll) {
		t.Error("a nil writer prints")
	}
	if (&eventWriter{kinds: EventNew}).on(EventPass) {
		t.Error("a writer for new lines prints pass lines")
	}
}
