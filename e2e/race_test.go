//go:build race

package e2e

// Under `go test -race` the daemon under test is built with the race
// detector too.
func init() { buildFlags = append(buildFlags, "-race") }
