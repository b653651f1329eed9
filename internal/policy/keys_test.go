package policy

import (
	"strings"
	"testing"
)

// Every key Keys lists has a decoder (no "unknown key", no "not decoded"),
// and a key it does not list is unknown: the parser's own check is Keys.
func TestKeysAreTheParsersKeys(t *testing.T) {
	up := "[[uplink]]\nname = \"b\"\nmark = 1\ninterface = \"eth1\"\n"
	files := map[string]func(k string) string{
		"":              func(k string) string { return k + " = 1\n" },
		"daemon":        func(k string) string { return "[daemon]\n" + k + " = 1\n" },
		"uplink":        func(k string) string { return "[[uplink]]\nname = \"b\"\nmark = 1\n" + k + " = 1\n" },
		"uplink.health": func(k string) string { return up + "[uplink.health]\n" + k + " = 1\n" },
		"rule":          func(k string) string { return up + "[[rule]]\nuplink = \"b\"\n" + k + " = 1\n" },
		"usage":         func(k string) string { return "[usage]\n" + k + " = 1\n" },
	}
	for table, keys := range Keys {
		file, ok := files[table]
		if !ok {
			t.Fatalf("Keys has table %q, which this test does not know", table)
		}
		for _, k := range append(keys, "no_such_key") {
			_, err := Parse("keys.toml", []byte(file(k)))
			var msg string
			if err != nil {
				msg = err.Error()
			}
			unknown := strings.Contains(msg, "unknown key \""+k+"\"")
			if k == "no_such_key" && !unknown {
				t.Errorf("[%s] %s: want an unknown key error, got %q", table, k, msg)
			}
			if k != "no_such_key" && (unknown || strings.Contains(msg, "not decoded")) {
				t.Errorf("[%s] %s is in Keys but the parser does not decode it: %s", table, k, msg)
			}
		}
	}
}
