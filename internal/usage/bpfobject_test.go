package usage

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
)

var record = flag.Bool("record", false, "rewrite bpf/usage.sha256 from the files as they are (after go generate)")

// recordFile holds the SHA-256 of what usage_bpfel.o was built from
// (bpf/usage.c, and gen.go's bpf2go line: compiler and flags) and of
// the object itself, as of the last go generate.
const recordFile = "bpf/usage.sha256"

// bpfInputs are the record's lines, computed from the files as they are.
func bpfInputs(t *testing.T) string {
	t.Helper()
	read := func(name string) []byte {
		b, err := os.ReadFile(name)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	gen := regexp.MustCompile(`(?m)^//go:generate go run github.com/cilium/ebpf/cmd/bpf2go .*$`).Find(read("gen.go"))
	if gen == nil {
		t.Fatal("gen.go has no bpf2go go:generate line")
	}
	sum := func(b []byte) string { s := sha256.Sum256(b); return hex.EncodeToString(s[:]) }
	return fmt.Sprintf("source %s bpf/usage.c\nflags  %s gen.go's bpf2go line\nobject %s usage_bpfel.o\n",
		sum(read("bpf/usage.c")), sum(gen), sum(read("usage_bpfel.o")))
}

// The committed object is the one built from the committed source with
// gen.go's flags: a change to usage.c or to the flags without go
// generate, or an object regenerated without a new record, fails here.
// (No compiler is needed: clang is not installed everywhere the tests
// run, so this compares hashes recorded at go generate time; it cannot
// tell an object built from other sources and recorded by hand.)
func TestBPFObjectIsCurrent(t *testing.T) {
	got := bpfInputs(t)
	if *record {
		if err := os.WriteFile(recordFile, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(recordFile)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(want, []byte(got)) {
		var stale []string
		wl, gl := strings.Split(string(want), "\n"), strings.Split(got, "\n")
		for i := range gl {
			if i >= len(wl) || wl[i] != gl[i] {
				stale = append(stale, strings.Fields(gl[i] + " ?")[0])
			}
		}
		t.Fatalf("%s does not match the files (%s changed): run go generate ./internal/usage (it rebuilds usage_bpfel.o and the record)\nrecorded:\n%snow:\n%s",
			recordFile, strings.Join(stale, ", "), want, got)
	}
}
