package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// run is one fake guest run: the files it leaves in its run directory
// (fixtures from testdata; status "-" for none).
type run struct{ console, testLog, status string }

// fakeRuns returns a run func for guest.retrying that plays runs in order,
// and the number of runs it played.
func fakeRuns(t *testing.T, g *guest, runs ...run) (func() *result, *int) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "runs", "6.1.0-50-amd64")
	n := 0
	return func() *result {
		if n >= len(runs) {
			t.Fatalf("run %d: the kernel ran more than %d times", n+1, len(runs))
		}
		r := runs[n]
		n++
		if err := os.RemoveAll(out); err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(out, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, fixture := range map[string]string{"console.log": r.console, "test.log": r.testLog} {
			if fixture == "" {
				continue
			}
			b, err := os.ReadFile(filepath.Join("testdata", fixture))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(out, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if r.status != "-" {
			if err := os.WriteFile(filepath.Join(out, "status"), []byte(r.status), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		res := &result{k: kernel{version: "6.1.0-50-amd64"}, out: out}
		g.collect(res, nil)
		return res
	}, &n
}

var (
	passed     = run{"console-clean.log", "test-pass.log", "0\n"}
	int3Died   = run{"console-int3.log", "test-partial.log", "-"}
	summaryRE  = regexp.MustCompile(`(?m)^kernel 6\.1\.0-50-amd64: queue=nft-queue steering=connect datapaths=kernel,userspace passed=4 failed=0 skipped=0 time=\d+s retried=(\d)$`)
	noResultRE = regexp.MustCompile(`(?m)^kernel 6\.1\.0-50-amd64: no result: .* retried=(\d)\)$`)
)

func TestCleanRunPasses(t *testing.T) {
	g := &guest{}
	play, n := fakeRuns(t, g, passed)
	res := g.retrying(play)
	if !res.ok() || *n != 1 {
		t.Fatalf("ok=%v after %d runs, want ok after 1: %s", res.ok(), *n, res.report())
	}
	if m := summaryRE.FindStringSubmatch(res.report()); m == nil || m[1] != "0" {
		t.Errorf("report has no summary line with retried=0:\n%s", res.report())
	}
}

func TestInt3OopsRunsOnceMore(t *testing.T) {
	for _, console := range []string{"console-int3.log", "console-int3-5.10.log"} {
		t.Run(console, func(t *testing.T) {
			g := &guest{}
			play, n := fakeRuns(t, g, run{console, "test-partial.log", "-"}, passed)
			res := g.retrying(play)
			if *n != 2 {
				t.Fatalf("the kernel ran %d times, want 2", *n)
			}
			if !res.ok() || res.retried != 1 {
				t.Fatalf("ok=%v retried=%d, want ok, retried=1:\n%s", res.ok(), res.retried, res.report())
			}
			if m := summaryRE.FindStringSubmatch(res.report()); m == nil || m[1] != "1" {
				t.Errorf("report has no summary line with retried=1:\n%s", res.report())
			}
			if !strings.Contains(res.report(), "int3: 0000 [#1]") {
				t.Errorf("report does not say why it ran again:\n%s", res.report())
			}
			// The first run's logs are kept beside the second's.
			kept, err := os.ReadFile(filepath.Join(res.out+".oops", "console.log"))
			if err != nil || !strings.Contains(string(kept), "int3") {
				t.Errorf("first run's console not kept in %s.oops: %v", res.out, err)
			}
		})
	}
}

func TestOtherOopsFails(t *testing.T) {
	for _, r := range []run{
		{"console-nullderef.log", "test-partial.log", "-"},
		{"console-init-died.log", "", "-"},
		// An oops the kernel survived fails the kernel even when every
		// test passed.
		{"console-oops-survived.log", "test-pass.log", "0\n"},
	} {
		t.Run(r.console, func(t *testing.T) {
			g := &guest{}
			play, n := fakeRuns(t, g, r, passed)
			res := g.retrying(play)
			if *n != 1 {
				t.Fatalf("the kernel ran %d times, want 1 (no rerun but for int3)", *n)
			}
			if res.ok() || res.retried != 0 || res.death == "" {
				t.Fatalf("ok=%v retried=%d death=%q, want a failure with its death line", res.ok(), res.retried, res.death)
			}
			if !strings.Contains(res.report(), "the guest's kernel died: "+res.death) {
				t.Errorf("report does not name the death:\n%s", res.report())
			}
		})
	}
}

func TestSecondDeathFails(t *testing.T) {
	for _, second := range []run{int3Died, {"console-nullderef.log", "test-partial.log", "-"}} {
		t.Run(second.console, func(t *testing.T) {
			g := &guest{}
			play, n := fakeRuns(t, g, int3Died, second)
			res := g.retrying(play)
			if *n != 2 {
				t.Fatalf("the kernel ran %d times, want 2", *n)
			}
			if res.ok() || res.retried != 1 {
				t.Fatalf("ok=%v retried=%d, want a failure after one rerun", res.ok(), res.retried)
			}
			if m := noResultRE.FindStringSubmatch(res.report()); m == nil || m[1] != "1" {
				t.Errorf("report has no no-result line with retried=1:\n%s", res.report())
			}
		})
	}
}

func TestStatusFile(t *testing.T) {
	for _, tc := range []struct {
		status string
		ok     bool
	}{{"0\n", true}, {"", false}, {"\n", false}, {"-", false}, {"1\n", false}, {"garbage", false}} {
		g := &guest{}
		play, _ := fakeRuns(t, g, run{"console-clean.log", "test-pass.log", tc.status})
		res := g.retrying(play)
		if res.ok() != tc.ok {
			t.Errorf("status %q: ok=%v, want %v:\n%s", tc.status, res.ok(), tc.ok, res.report())
		}
	}
}

func TestExpectedTests(t *testing.T) {
	for _, tc := range []struct {
		run     string
		expect  int
		problem string // "" for none
	}{
		{`^(TestKernelHasEveryFeature|TestPingViaISPB|TestConnectSteering)$`, 4, ""},
		{`^(TestKernelHasEveryFeature|TestPingViaISPB|TestIPv6TCP)$`, 0, "no result for TestIPv6TCP, which -run names"},
		{`^TestIPv6TCP$`, 0, "no result for TestIPv6TCP, which -run names"},
		{`^(TestKernelHasEveryFeature|TestPingViaISPB)$`, 31, "passed 4 subtests, expected 31"},
		{`Ping`, 0, ""}, // not a list: nothing is expected by name
	} {
		g := &guest{expect: tc.expect, expectTests: expectedTests(tc.run)}
		play, _ := fakeRuns(t, g, passed)
		res := g.retrying(play)
		if tc.problem == "" {
			if !res.ok() {
				t.Errorf("-run %s -expect %d: not ok:\n%s", tc.run, tc.expect, res.report())
			}
			continue
		}
		if res.ok() || !slices.Contains(res.problems, tc.problem) || !strings.Contains(res.report(), tc.problem) {
			t.Errorf("-run %s -expect %d: ok=%v problems=%q, want a failure saying %q", tc.run, tc.expect, res.ok(), res.problems, tc.problem)
		}
	}
}

// The Makefile's KERNEL_CORE is a list expectedTests reads, and each test it
// names exists in ./e2e.
func TestKernelCoreIsAList(t *testing.T) {
	mk, err := os.ReadFile("../../Makefile")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^KERNEL_CORE\s*:?=\s*(\S+)$`).FindSubmatch(mk)
	if m == nil {
		t.Fatal("no KERNEL_CORE in the Makefile")
	}
	core := strings.ReplaceAll(string(m[1]), "$$", "$")
	names := expectedTests(core)
	if len(names) < 10 {
		t.Fatalf("expectedTests(%s) = %q", core, names)
	}
	files, _ := filepath.Glob("../*_test.go")
	var src strings.Builder
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		src.Write(b)
	}
	for _, name := range names {
		if !strings.Contains(src.String(), "func "+name+"(t *testing.T)") {
			t.Errorf("KERNEL_CORE names %s, which ./e2e does not have", name)
		}
	}
}

func TestResolveKernels(t *testing.T) {
	got, err := resolveKernels(strings.Fields("5.10 6.1 6.12 bookworm-backports sid linux-image-6.1.0-50-amd64 mysuite"), []string{"mysuite"})
	want := strings.Fields("bullseye bookworm trixie bookworm-backports sid linux-image-6.1.0-50-amd64 mysuite")
	if err != nil || !slices.Equal(got, want) {
		t.Errorf("resolveKernels = %q, %v; want %q", got, err, want)
	}
	for _, bad := range []string{"6.2", "bookwrom", "linux-image-", "4.19"} {
		_, err := resolveKernels([]string{"bookworm", bad}, nil)
		if err == nil || strings.Contains(err.Error(), "\n") ||
			!strings.Contains(err.Error(), `"`+bad+`"`) || !strings.Contains(err.Error(), "5.10, 6.1, 6.12") {
			t.Errorf("resolveKernels(%q): %v, want a one-line error naming it and the known kernels", bad, err)
		}
	}
	if _, err := resolveKernels(nil, nil); err == nil {
		t.Error("no kernels: no error")
	}
}

// The summary says which steering the daemons ran; a kernel of Linux 5.14
// or later (the guest mounts cgroup v2) must not fall back to the queue.
func TestSteeringFallbackOnlyBefore514(t *testing.T) {
	for _, tc := range []struct {
		version, log, steering string
		ok                     bool
	}{
		{"6.1.0-50-amd64", "test-pass.log", "connect", true},
		{"6.1.0-50-amd64", "test-pass-fellback.log", "queue", false},
		{"6.12.117+deb13-amd64", "test-pass-fellback.log", "queue", false},
		{"5.14.0-1-amd64", "test-pass-fellback.log", "queue", false},
		{"5.10.0-32-amd64", "test-pass-fellback.log", "queue", true},
	} {
		out := t.TempDir()
		for name, fixture := range map[string]string{"console.log": "console-clean.log", "test.log": tc.log} {
			b, err := os.ReadFile(filepath.Join("testdata", fixture))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(out, name), b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.WriteFile(filepath.Join(out, "status"), []byte("0\n"), 0o644); err != nil {
			t.Fatal(err)
		}
		res := &result{k: kernel{version: tc.version}, out: out}
		(&guest{}).collect(res, nil)
		if res.ok() != tc.ok {
			t.Errorf("%s with %s: ok=%v, want %v:\n%s", tc.version, tc.log, res.ok(), tc.ok, res.report())
		}
		if want := "steering=" + tc.steering + " "; !strings.Contains(res.report(), want) {
			t.Errorf("%s with %s: the summary does not say %q:\n%s", tc.version, tc.log, want, res.report())
		}
	}
}

// A failed test's report carries its own lines (why it failed), and not
// another test's, nor the test binary's summary after the last test.
func TestFailureSaysWhy(t *testing.T) {
	g := &guest{}
	play, _ := fakeRuns(t, g, run{"console-clean.log", "test-fail.log", "1\n"})
	res := g.retrying(play)
	rep := res.report()
	if res.ok() || !strings.Contains(rep, "FAIL TestPingViaISPB/userspace\n") {
		t.Fatalf("ok=%v, want the subtest's failure named:\n%s", res.ok(), rep)
	}
	if !strings.Contains(rep, "ping_test.go:40: ISP B saw 0 echo requests, want 3") {
		t.Errorf("report lacks the failed test's error line:\n%s", rep)
	}
	if strings.Contains(rep, "steercheck_test.go") {
		t.Errorf("report shows another test's lines:\n%s", rep)
	}
}

// A long test output keeps its first lines and its last, and says how
// many it left out.
func TestTestLinesKeepsHeadAndTail(t *testing.T) {
	var l testLines
	for i := range 100 {
		l.add(fmt.Sprintf("line %d", i))
	}
	got := strings.Split(l.String(), "\n")
	left := 100 - headLines - tailLines
	if len(got) != headLines+1+tailLines || got[0] != "line 0" || got[headLines-1] != fmt.Sprintf("line %d", headLines-1) ||
		got[headLines] != fmt.Sprintf("... (%d lines)", left) || got[headLines+1] != fmt.Sprintf("line %d", headLines+left) || got[len(got)-1] != "line 99" {
		t.Errorf("kept:\n%s", l.String())
	}
}

// The last test's lines end at its result: the binary's FAIL and the
// guest's own lines after it are no test's.
func TestFailureOfTheLastTest(t *testing.T) {
	g := &guest{}
	play, _ := fakeRuns(t, g, run{"console-clean.log", "test-fail-last.log", "1\n"})
	rep := g.retrying(play).report()
	if !strings.Contains(rep, "usage_test.go:364: isp-b bytes out: counted 0") {
		t.Errorf("report lacks the failed test's error line:\n%s", rep)
	}
	if strings.Contains(rep, "tests took") || strings.Contains(rep, "        FAIL\n") {
		t.Errorf("report gives the test the binary's lines after it:\n%s", rep)
	}
}
