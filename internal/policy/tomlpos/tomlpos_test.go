package tomlpos

import "testing"

// Each [[array]] table keeps its own keys, a subtable belongs to the latest
// one, and values spanning lines hide what looks like keys inside them.
func TestLocate(t *testing.T) {
	src := `# comment
[daemon]
queue = 7

[[rule]]
name = "a"
dst = [
  "192.0.2.0/24", # x = 1
]

[[rule]]
  name = """
not = a key
"""
  dport = 80

[[uplink]]
name = "b"
[uplink.health]
interval = "1s"
`
	ps := Locate(src)
	for path, want := range map[string][2]int{
		"daemon.queue":             {3, 1},
		"rule.0":                   {5, 1},
		"rule.0.dst":               {7, 1},
		"rule.1.name":              {12, 3},
		"rule.1.dport":             {15, 3},
		"rule.1.dport.2":           {15, 3}, // the nearest written parent
		"uplink.0.health":          {19, 1},
		"uplink.0.health.interval": {20, 1},
		"nothing":                  {1, 1},
	} {
		if l, c := ps.Of(path); l != want[0] || c != want[1] {
			t.Errorf("%s at %d:%d, want %d:%d", path, l, c, want[0], want[1])
		}
	}
	if _, ok := ps["rule.0.x"]; ok {
		t.Error("a key in a comment inside a list was indexed")
	}
	if _, ok := ps["rule.1.not"]; ok {
		t.Error("a line of a multi-line string was indexed")
	}
}

func TestLineCol(t *testing.T) {
	src := []byte("ab\ncd\n")
	for off, want := range map[int][2]int{0: {1, 1}, 1: {1, 2}, 3: {2, 1}, 4: {2, 2}, 99: {3, 1}, -1: {1, 1}} {
		if l, c := LineCol(src, off); l != want[0] || c != want[1] {
			t.Errorf("offset %d at %d:%d, want %d:%d", off, l, c, want[0], want[1])
		}
	}
}
