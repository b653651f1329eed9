//go:build race

package e2e

import "os"

// Under `go test -race` the daemon under test, its CLI and the lab are
// built with the race detector too. A race-built program sleeps a second
// before it exits (GORACE's atexit_sleep_ms, 1000 by default): every
// `rerouted uplinks` a test polls would take a second, longer than the
// windows the tests give the daemon to react in. The children of the
// tests inherit atexit_sleep_ms=0; races are reported all the same.
func init() {
	buildFlags = append(buildFlags, "-race")
	opts := "atexit_sleep_ms=0"
	if g := os.Getenv("GORACE"); g != "" {
		opts = g + " " + opts
	}
	os.Setenv("GORACE", opts)
}
