package main

import (
	"bytes"
	"runtime/debug"
	"testing"
)

func TestPrintVersion(t *testing.T) {
	stamped := &debug.BuildInfo{
		GoVersion: "go1.26.8",
		Main:      debug.Module{Path: "github.com/rerouted/rerouted", Version: "v0.0.0-20261207041424-9f9e9fe0a1b2+dirty"},
		Settings: []debug.BuildSetting{
			{Key: "vcs", Value: "git"},
			{Key: "vcs.revision", Value: "9f9e9fe0a1b2c3d4"},
			{Key: "vcs.modified", Value: "true"},
		},
	}
	for _, tc := range []struct {
		name   string
		linked linked
		bi     *debug.BuildInfo
		want   string
	}{
		{"linked version wins", linked{version: "v1.2.0-3-g9f9e9fe-dirty"}, stamped,
			"rerouted v1.2.0-3-g9f9e9fe-dirty\ncommit 9f9e9fe0a1b2c3d4 (modified)\ngo go1.26.8\n"},
		{"module version without -X", linked{}, stamped,
			"rerouted v0.0.0-20261207041424-9f9e9fe0a1b2+dirty\ncommit 9f9e9fe0a1b2c3d4 (modified)\ngo go1.26.8\n"},
		{"clean tree", linked{version: "v1.2.0"}, &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"},
			Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "abc"}, {Key: "vcs.modified", Value: "false"}}},
			"rerouted v1.2.0\ncommit abc\ngo go1.26.8\n"},
		{"no vcs stamp", linked{}, &debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"}},
			"rerouted (devel)\ncommit unknown\ngo go1.26.8\n"},
		{"stamp wins over the linked commit", linked{version: "v1.2.0", commit: "def", modified: false}, stamped,
			"rerouted v1.2.0\ncommit 9f9e9fe0a1b2c3d4 (modified)\ngo go1.26.8\n"},
		{"worktree: the linked commit", linked{version: "9f9e9fe-dirty", commit: "9f9e9fe0", modified: true},
			&debug.BuildInfo{GoVersion: "go1.26.8", Main: debug.Module{Version: "(devel)"}},
			"rerouted 9f9e9fe-dirty\ncommit 9f9e9fe0 (modified)\ngo go1.26.8\n"},
		{"no build info", linked{}, nil, "rerouted unknown\ncommit unknown\ngo unknown\n"},
	} {
		var b bytes.Buffer
		printVersion(&b, tc.linked, tc.bi)
		if b.String() != tc.want {
			t.Errorf("%s: got\n%s\nwant\n%s", tc.name, b.String(), tc.want)
		}
	}
}
