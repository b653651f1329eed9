package usage

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

// Sockets the kernel could not enter are logged at WARNING once per rise
// of their count, with how many more and the total.
func TestNotCountedIsLogged(t *testing.T) {
	var out bytes.Buffer
	a := &Accounting{d: Deps{Log: slog.New(slog.NewTextHandler(&out, nil))}}
	for _, n := range []uint64{0, 3, 3, 5} {
		a.reportNotCounted(n)
	}
	lines := strings.Split(strings.TrimSpace(out.String()), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], "level=WARN") ||
		!strings.Contains(lines[0], "sockets=3 total=3") || !strings.Contains(lines[1], "sockets=2 total=5") {
		t.Fatalf("logged:\n%s\nwant two warnings: 3 of 3, then 2 more of 5", out.String())
	}
}
