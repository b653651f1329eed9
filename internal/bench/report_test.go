package bench

import (
	"errors"
	"strings"
	"testing"
)

// The paired table divides each round's figure by its baseline's in the
// same round, and takes the median of those ratios: a round in which the
// whole machine slowed moves path and baseline alike, and a failed round
// is left out.
func TestPairedTable(t *testing.T) {
	res := func(path string, seq float64) Result {
		return Result{Path: path, UpGbps: 1, DownGbps: 1, SeqRate: seq, ParRate: seq}
	}
	rounds := [][]Result{
		{res("masquerade", 1000), res("masquerade", 500), res("masquerade", 1000), res("masquerade", 1000)},
		{res("rerouted-kernel", 900), res("rerouted-kernel", 450), res("rerouted-kernel", 800), {Path: "rerouted-kernel", Err: errors.New("x")}},
		{res("rerouted-kernel-noacct", 1000), res("rerouted-kernel-noacct", 450), res("rerouted-kernel-noacct", 900), res("rerouted-kernel-noacct", 900)},
	}
	rs := []Result{median(rounds[0]), median(rounds[1]), median(rounds[2])}
	var b strings.Builder
	PairedTable(&b, rs, rounds)
	out := b.String()
	for _, want := range []string{
		"| rerouted-kernel | masquerade | 1.00 (1.00–1.00) | 1.00 (1.00–1.00) | 0.90 (0.80–0.90) | 0.90 (0.80–0.90) | 3 |",
		"| rerouted-kernel-noacct | masquerade | 1.00 (1.00–1.00) | 1.00 (1.00–1.00) | 0.90 (0.90–1.00) | 0.90 (0.90–1.00) | 4 |",
		"| rerouted-kernel-noacct | rerouted-kernel | 1.00 (1.00–1.00) | 1.00 (1.00–1.00) | 1.11 (1.00–1.12) | 1.11 (1.00–1.12) | 3 |",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("no row %q in:\n%s", want, out)
		}
	}
}
