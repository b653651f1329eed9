package policy

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// docSections maps a Keys table to the heading of its section in
// docs/configuration.md; the top level's keys are the sections themselves.
var docSections = map[string]string{"daemon": "[daemon]", "uplink": "[[uplink]]", "uplink.health": "[uplink.health]", "rule": "[[rule]]", "usage": "[usage]"}

// Every key the parser accepts (Keys) has a row of its own in its table's
// section of docs/configuration.md, with its type, default, whether a
// reload applies it, and its meaning; and every key that page documents
// is one the parser accepts.
func TestConfigurationReferenceComplete(t *testing.T) {
	b, err := os.ReadFile("../../docs/configuration.md")
	if err != nil {
		t.Fatal(err)
	}
	sections := map[string][][]string{} // heading: rows, as cells
	var heading string
	row := regexp.MustCompile("^\\| `([a-z0-9_]+)` \\|")
	for _, l := range strings.Split(string(b), "\n") {
		if h, ok := strings.CutPrefix(l, "## "); ok {
			heading = h
			sections[heading] = nil
			continue
		}
		if row.MatchString(l) {
			cells := strings.Split(strings.Trim(l, "|"), " | ")
			for i := range cells {
				cells[i] = strings.TrimSpace(cells[i])
			}
			sections[heading] = append(sections[heading], cells)
		}
	}
	for _, k := range Keys[""] {
		table := k
		if _, ok := sections[docSections[table]]; !ok {
			t.Errorf("docs/configuration.md has no section \"## %s\" for the top-level key %q", docSections[table], k)
		}
	}
	for table, keys := range Keys {
		if table == "" {
			continue
		}
		h := docSections[table]
		documented := map[string]bool{}
		for _, cells := range sections[h] {
			k := strings.Trim(cells[0], "`")
			documented[k] = true
			if !slices.Contains(keys, k) {
				t.Errorf("docs/configuration.md, %s: %q is not a key the parser accepts there", h, k)
			}
			if len(cells) != 5 || slices.Contains(cells, "") {
				t.Errorf("docs/configuration.md, %s: the row of %q needs 5 cells (key, type, default, reload, meaning), has %q", h, k, cells)
			}
		}
		for _, k := range keys {
			if !documented[k] {
				t.Errorf("docs/configuration.md, %s: the key %q has no row (| `%s` | type | default | reload | meaning |)", h, k, k)
			}
		}
	}
}
