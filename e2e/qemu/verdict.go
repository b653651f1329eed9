package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// What a kernel's run must show to pass, and the one case in which it runs
// again: everything here reads the files a guest leaves in its run
// directory (test.log, status, console.log), so that it is tested with
// fixtures (testdata) and without QEMU.

// versionSuites are the kernels docs/testing.md names by version, as the
// Debian suites whose kernel they are.
var versionSuites = map[string]string{"5.10": "bullseye", "6.1": "bookworm", "6.12": "trixie"}

// suites are the Debian suites a kernel can be named by (with their
// -backports), besides those of $KERNEL_SUITES.
var suites = []string{"bullseye", "bookworm", "trixie", "forky", "sid", "oldstable", "stable", "testing", "unstable"}

var packageRE = regexp.MustCompile(`^linux-image-[0-9][A-Za-z0-9.+~-]*$`)

// resolveKernels turns the names KERNELS gives into what fetch.sh takes:
// a version docs/testing.md prints (6.1) becomes its suite (bookworm); a suite
// or a linux-image package stays; anything else is an error naming what is
// known.
func resolveKernels(names, extraSuites []string) ([]string, error) {
	if len(names) == 0 {
		return nil, errors.New("no kernels named")
	}
	known := append(slices.Clone(suites), extraSuites...)
	var out []string
	for _, n := range names {
		base, _ := strings.CutSuffix(n, "-backports")
		switch {
		case versionSuites[n] != "":
			out = append(out, versionSuites[n])
		case slices.Contains(known, base), packageRE.MatchString(n):
			out = append(out, n)
		default:
			return nil, fmt.Errorf("unknown kernel %q: known are 5.10, 6.1, 6.12 (bullseye, bookworm, trixie), the suites %s (and SUITE-backports), and packages linux-image-VERSION-amd64",
				n, strings.Join(known, " "))
		}
	}
	return out, nil
}

// expectedTests are the tests a -run regex names when it is a list:
// ^TestA$ or ^(TestA|TestB)$. Any other regex names none.
func expectedTests(run string) []string {
	m := regexp.MustCompile(`^\^\(?([A-Za-z0-9_|]+?)\)?\$$`).FindStringSubmatch(run)
	if m == nil || strings.Count(run, "(") != strings.Count(run, ")") {
		return nil
	}
	return strings.Split(m[1], "|")
}

var (
	// A kernel's oops header ("Oops: int3: 0000 [#1] PREEMPT SMP NOPTI";
	// before 6.x without "Oops: "), a BUG line, or a panic.
	deathRE = regexp.MustCompile(`(: [0-9a-f]{4} \[#\d+\])|BUG:|Kernel panic`)
	// QEMU's TCG artefact: a vCPU ran the int3 text_poke_bp leaves while
	// the kernel patched a static key (netfilter hooks coming and going),
	// which real CPUs cannot.
	int3RE = regexp.MustCompile(`(^|\] |Oops: )int3: [0-9a-f]{4} \[#1\]`)
)

// deaths reads a console log: the first line where the kernel oopsed,
// panicked or found a BUG, and whether that line is the int3 artefact.
func deaths(console string) (first string, int3 bool) {
	for _, l := range strings.Split(console, "\n") {
		if deathRE.MatchString(l) {
			l = strings.TrimSpace(l)
			return l, int3RE.MatchString(l)
		}
	}
	return "", false
}

// collect reads what the guest left in res.out; qemuErr is how QEMU
// ended.
func (g *guest) collect(res *result, qemuErr error) {
	res.parse(filepath.Join(res.out, "test.log"))
	status, serr := os.ReadFile(filepath.Join(res.out, "status"))
	switch {
	case serr == nil:
		code, err := strconv.Atoi(strings.TrimSpace(string(status)))
		if err != nil {
			res.err = fmt.Errorf("the guest's status file holds %q, not an exit code", strings.TrimSpace(string(status)))
		}
		res.exitCode = code
	case qemuErr != nil:
		res.err = qemuErr
	default:
		res.err = errors.New("the guest wrote no status")
	}
	if c, err := os.ReadFile(filepath.Join(res.out, "console.log")); err == nil {
		res.death, res.int3 = deaths(string(c))
	}
	for _, name := range g.expectTests {
		if _, ok := res.top[name]; !ok {
			res.problems = append(res.problems, fmt.Sprintf("no result for %s, which -run names", name))
		}
	}
	if slices.Contains(res.steering, "queue") && steersFrom(res.k.version) {
		res.problems = append(res.problems, "connect-time steering fell back to the queue on a kernel that has it (Linux ≥ 5.14)")
	}
	if n := res.count("PASS"); g.expect > 0 && n != g.expect && res.err == nil {
		res.problems = append(res.problems, fmt.Sprintf("passed %d subtests, expected %d", n, g.expect))
	}
	if !res.ok() {
		res.console = tail(filepath.Join(res.out, "console.log"), 15)
	}
	if res.err != nil {
		res.logTail = tail(filepath.Join(res.out, "test.log"), 10)
	}
}

// steersFrom says whether a kernel release (6.1.0-50-amd64) has what
// connect-time steering needs: Linux 5.14 (SO_NETNS_COOKIE). The guest
// mounts cgroup v2 itself, so only the kernel can excuse a fallback.
func steersFrom(release string) bool {
	f := strings.FieldsFunc(release, func(r rune) bool { return r == '.' || r == '-' || r == '+' })
	if len(f) < 2 {
		return true // unreadable: a fallback is not excused
	}
	major, err1 := strconv.Atoi(f[0])
	minor, err2 := strconv.Atoi(f[1])
	if err1 != nil || err2 != nil {
		return true
	}
	return major > 5 || major == 5 && minor >= 14
}

// retrying runs a kernel, and once more when its first run's guest kernel
// died of the int3 artefact; the first run's logs are kept beside the
// second's (VERSION.oops). Any other oops or panic fails the kernel, and
// so does a second death of any kind.
func (g *guest) retrying(run func() *result) *result {
	res := run()
	if res.death == "" || !res.int3 {
		return res
	}
	kept := res.out + ".oops"
	os.RemoveAll(kept)
	if err := os.Rename(res.out, kept); err != nil {
		kept = res.out + " (lost: " + err.Error() + ")"
	}
	first, elapsed := res.death, res.elapsed
	res = run()
	res.elapsed += elapsed
	res.retried = 1
	res.retryWhy = fmt.Sprintf("the first run's guest kernel died of QEMU's int3 artefact (%s; its logs: %s), so this kernel ran again", first, kept)
	return res
}
