package testenv

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

// The helper's verdicts, each in a child process (a skip and a failure end
// the test that calls it): with RequireEnv=1 a skip is a failure that says
// why; without it, a skip with the message.
func TestSkip(t *testing.T) {
	if os.Getenv("TESTENV_CHILD") == "1" {
		Skip(t, "no %s here", "frobnicator")
		t.Fatal("Skip returned")
	}
	for _, tc := range []struct {
		require string
		want    []string
	}{
		{"", []string{"--- SKIP: TestSkip", "no frobnicator here", "\nPASS"}},
		{"1", []string{"--- FAIL: TestSkip", "no frobnicator here, and REROUTED_REQUIRE_E2E=1 forbids skipping", "\nFAIL"}},
	} {
		cmd := exec.Command(os.Args[0], "-test.run=^TestSkip$", "-test.v")
		cmd.Env = append(os.Environ(), "TESTENV_CHILD=1", RequireEnv+"="+tc.require)
		out, _ := cmd.CombinedOutput()
		for _, w := range tc.want {
			if !strings.Contains(string(out), w) {
				t.Errorf("%s=%q: output lacks %q:\n%s", RequireEnv, tc.require, w, out)
			}
		}
	}
}

func TestNeedRoot(t *testing.T) {
	if os.Getenv("TESTENV_CHILD") == "1" {
		NeedRoot(t, "to chown")
		return
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestNeedRoot$", "-test.v")
	cmd.Env = append(os.Environ(), "TESTENV_CHILD=1", RequireEnv+"=1")
	out, err := cmd.CombinedOutput()
	if os.Geteuid() == 0 {
		if err != nil || !strings.Contains(string(out), "--- PASS: TestNeedRoot") {
			t.Errorf("as root NeedRoot stopped the test: %v\n%s", err, out)
		}
	} else if err == nil || !strings.Contains(string(out), "needs root (to chown), and REROUTED_REQUIRE_E2E=1 forbids skipping") {
		t.Errorf("without root under %s=1, NeedRoot did not fail: %v\n%s", RequireEnv, err, out)
	}
}
