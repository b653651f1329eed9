package main

import (
	"os/exec"
	"strings"
	"testing"
)

// The daemon never runs ip or nft, and does not link the code that does:
// the namespace world (internal/networld) and what runs in it (the bench,
// the demo) are in cmd/rerouted-lab. Of the module's own packages the
// daemon links, only those named here may run programs at all.
func TestDaemonDoesNotLinkTheLab(t *testing.T) {
	goTool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("no go tool to list the dependencies with")
	}
	const module = "github.com/rerouted/rerouted/"
	forbidden := []string{"internal/networld", "internal/bench"}
	mayExec := map[string]string{
		"internal/doctor": "reads iptables-legacy-save's output, and changes nothing",
	}
	out, err := exec.Command(goTool, "list", "-deps", "-f", `{{.ImportPath}} {{join .Imports " "}}`, ".").Output()
	if err != nil {
		t.Fatalf("go list -deps: %v", err)
	}
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		pkg, imports, _ := strings.Cut(line, " ")
		rel, ours := strings.CutPrefix(pkg, module)
		if !ours {
			continue
		}
		for _, f := range forbidden {
			if rel == f || strings.HasPrefix(rel, f+"/") {
				t.Errorf("rerouted links %s: it runs ip and nft; keep it in cmd/rerouted-lab", rel)
			}
		}
		for _, imp := range strings.Fields(imports) {
			if imp == "os/exec" && mayExec[rel] == "" {
				t.Errorf("rerouted links %s, which imports os/exec: the daemon runs no programs (if this one must, say why in mayExec)", rel)
			}
		}
	}
}
