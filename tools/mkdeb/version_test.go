package main

import (
	"os/exec"
	"testing"
)

func TestDebVersion(t *testing.T) {
	for describe, want := range map[string]string{
		"v1.2.3":                      "1.2.3",
		"1.2.3":                       "1.2.3",
		"v1.2.3-rc1":                  "1.2.3~rc1",
		"v1.2.3-4-gabc1234":           "1.2.3+4.gabc1234",
		"v1.2.3-4-gabc1234-dirty":     "1.2.3+4.gabc1234.dirty",
		"v1.2.3-dirty":                "1.2.3+dirty",
		"v1.2.3-rc.1-4-gabc1234":      "1.2.3~rc.1+4.gabc1234",
		"abc1234":                     "0.0~git.abc1234",
		"9f9e9fe":                     "0.0~git.9f9e9fe",
		"9f9e9fe-dirty":               "0.0~git.9f9e9fe.dirty",
		"release_2":                   "0~release.2",
		"v2.0.0-beta-2-g0123456789ab": "2.0.0~beta+2.g0123456789ab",
	} {
		got, err := debVersion(describe)
		if err != nil || got != want {
			t.Errorf("debVersion(%q) = %q, %v; want %q", describe, got, err, want)
		}
	}
	if _, err := debVersion(" "); err == nil {
		t.Error("debVersion of nothing: no error")
	}
}

// dpkg orders the versions as the builds: a pre-release before its
// release, commits after a tag after it, any tag after untagged builds.
func TestDebVersionOrder(t *testing.T) {
	requireTool(t, "dpkg")
	order := []string{"abc1234", "v0.1.0-rc1", "v0.1.0", "v0.1.0-3-gabc1234", "v0.1.0-3-gabc1234-dirty", "v0.2.0"}
	for i := 1; i < len(order); i++ {
		a, _ := debVersion(order[i-1])
		b, _ := debVersion(order[i])
		if err := exec.Command("dpkg", "--compare-versions", a+"-1", "lt", b+"-1").Run(); err != nil {
			t.Errorf("dpkg: %s (%s) is not before %s (%s)", a, order[i-1], b, order[i])
		}
	}
}
