// Command qemu runs the end-to-end tests on other kernels (make
// test-kernels): for each kernel named, it fetches Debian's stock package
// (fetch.sh), boots it under QEMU with the host's root shared read-only
// (init.sh, then guest.sh inside the guest), runs the e2e test binary built
// here, and prints one line per kernel:
//
//	kernel 6.1.0-50-amd64: queue=nft-queue steering=connect datapaths=kernel,userspace passed=N failed=0 skipped=M time=95s retried=0
//
// queue is the enqueue form the daemon chose there (nft-queue: the native
// nft queue statement; xt-nfqueue: the xtables target through nft_compat);
// retried is 1 when the first run's guest kernel died of QEMU's int3
// artefact (verdict.go). Each kernel's test.log and console.log stay in
// CACHE/runs/VERSION. It exits 1 when any test failed, any kernel gave no
// result, oopsed or panicked (but for that one rerun), lacks a result for a
// test -run lists, or passed other than -expect subtests.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	kernels := flag.String("kernels", "bullseye bookworm trixie", "Debian suites or linux-image-VERSION-amd64 packages, space-separated")
	run := flag.String("run", "", "regex of the tests to run (go test -run); empty: all")
	cache := flag.String("cache", ".cache/kernels", "where packages, unpacked kernels, builds and run logs are kept")
	jobs := flag.Int("jobs", 1, "kernels booted at once")
	timeout := flag.Duration("timeout", 90*time.Minute, "the test binary's -test.timeout in each guest (the guest is killed 3 minutes later)")
	mem := flag.Int("mem", 2048, "guest memory, MiB")
	smp := flag.Int("smp", 2, "guest CPUs")
	cpu := flag.String("cpu", "max", "guest CPU model under TCG (with KVM: host)")
	modules := flag.String("modules", strings.Join(preload, " "), "modules the guest loads before the tests")
	echo := flag.Bool("echo", false, "print every daemon's lines in test.log as they come (for a test that hangs)")
	autoload := flag.Bool("autoload", true, "let the kernel load modules on first use (false: as in a chroot without the kernel's modules)")
	expect := flag.Int("expect", 0, "subtests each kernel must pass, exactly (0: no check)")
	accel := flag.String("accel", "auto", "kvm, tcg, or auto: KVM where /dev/kvm opens (a nested /dev/kvm may not run a guest: -accel tcg)")
	flag.Parse()
	if err := os.Chdir(repoRoot()); err != nil {
		fatal(err)
	}
	entries, err := resolveKernels(strings.Fields(*kernels), strings.Fields(os.Getenv("KERNEL_SUITES")))
	if err != nil {
		fatal(err)
	}
	cacheDir, err := filepath.Abs(*cache)
	if err != nil {
		fatal(err)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	ks, err := fetch(ctx, cacheDir, entries)
	if err != nil {
		fatal(err)
	}
	// A build of this run's own: runs may overlap.
	build, err := os.MkdirTemp(cacheDir, "build-")
	if err != nil {
		fatal(err)
	}
	defer os.RemoveAll(build)
	if err := buildTests(ctx, build); err != nil {
		os.RemoveAll(build)
		fatal(err)
	}
	g := guest{cache: cacheDir, build: build, run: *run, timeout: *timeout, mem: *mem, smp: *smp, cpu: *cpu,
		modules: *modules, autoload: *autoload, echo: *echo, expect: *expect, expectTests: expectedTests(*run)}
	switch *accel {
	case "kvm":
		g.kvm = true
	case "tcg":
	case "auto":
		g.kvm = kvmWorks()
		if !g.kvm {
			fmt.Println("kernels: QEMU emulates the CPU (TCG): KVM is not available here, or cannot run a guest (a nested /dev/kvm)")
		}
	default:
		fatal(fmt.Errorf("-accel %q: kvm, tcg or auto", *accel))
	}

	// Kernels start in the order given, KERNEL_JOBS at once; their lines
	// come out in that order too.
	results := make([]chan *result, len(ks))
	next := make(chan int, len(ks))
	for i := range ks {
		results[i] = make(chan *result, 1)
		next <- i
	}
	close(next)
	for range max(*jobs, 1) {
		go func() {
			for i := range next {
				res := g.retrying(func() *result { return g.test(ctx, ks[i]) })
				results[i] <- res
			}
		}()
	}
	bad := false
	var passed, failed, skipped int
	for i := range ks {
		res := <-results[i]
		fmt.Print(res.report())
		bad = bad || !res.ok()
		passed, failed, skipped = passed+res.count("PASS"), failed+res.count("FAIL"), skipped+res.count("SKIP")
		if !res.ok() && res.count("FAIL") == 0 {
			failed++ // no result, or the binary failed outside any test
		}
	}
	fmt.Printf("kernels: %d passed, %d failed, %d skipped\n", passed, failed, skipped)
	if bad {
		os.RemoveAll(build)
		os.Exit(1)
	}
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "test-kernels: %v\n", err)
	os.Exit(1)
}

// repoRoot is the module's directory: this program runs from anywhere in it.
func repoRoot() string {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil || strings.TrimSpace(string(out)) == "" || strings.TrimSpace(string(out)) == os.DevNull {
		fatal(fmt.Errorf("cannot find the module's directory (go env GOMOD): %v", err))
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// kernel is one unpacked kernel package.
type kernel struct {
	entry, version, dir string
}

// fetch downloads and unpacks the kernels (fetch.sh prints one line each).
func fetch(ctx context.Context, cache string, entries []string) ([]kernel, error) {
	cmd := exec.CommandContext(ctx, "sh", append([]string{"e2e/qemu/fetch.sh", cache}, entries...)...)
	cmd.Stderr = os.Stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("fetch kernels: %w", err)
	}
	var ks []kernel
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) != 3 {
			return nil, fmt.Errorf("fetch.sh printed %q", line)
		}
		ks = append(ks, kernel{entry: f[0], version: f[1], dir: f[2]})
	}
	return ks, nil
}

// buildTests builds the e2e test binary and the programs it runs, so that
// no guest runs go. Without -race: under TCG it would be several times
// slower still.
func buildTests(ctx context.Context, dir string) error {
	for _, args := range [][]string{
		{"test", "-c", "-o", filepath.Join(dir, "e2e.test"), "./e2e"},
		{"build", "-o", filepath.Join(dir, "rerouted"), "./cmd/rerouted"},
		{"build", "-o", filepath.Join(dir, "rerouted-lab"), "./cmd/rerouted-lab"},
		{"build", "-o", filepath.Join(dir, "worldclient"), "./internal/networld/cmd/worldclient"},
	} {
		cmd := exec.CommandContext(ctx, "go", args...)
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			return fmt.Errorf("go %s: %w", strings.Join(args, " "), err)
		}
	}
	return nil
}

// preload are the modules the guest loads before the tests (with their
// dependencies): what rerouted and the test worlds use. The kernel would
// load each when first used, as on any host; under TCG that takes long
// enough to hold up a test's first daemon.
var preload = []string{
	// rerouted: nftables, both enqueue forms, its expressions, sock_diag
	"nf_tables", "nft_queue", "nft_compat", "xt_NFQUEUE", "nfnetlink_queue",
	"nft_fib_inet", "nft_socket", "nft_ct", "nft_hash", "nft_limit", "nft_numgen", "nft_tproxy",
	"inet_diag", "tcp_diag", "udp_diag", "raw_diag",
	// the worlds: veth, the host's mark rules, firewalls, NAT, conntrack
	"veth", "nft_chain_nat", "nft_masq", "nft_reject_inet", "nft_counter", "nft_objref",
	"iptable_mangle", "iptable_nat", "iptable_filter", "ip6table_mangle",
	"xt_mark", "xt_tcpudp", "xt_conntrack", "xt_MASQUERADE",
	"nf_conntrack_netlink",
}

// guest is how every kernel is booted and tested.
type guest struct {
	cache, build string
	run          string
	timeout      time.Duration
	mem, smp     int
	cpu          string
	kvm          bool
	modules      string
	autoload     bool
	echo         bool
	// What each kernel must show: every test the -run regex names
	// (expectedTests), and exactly expect passed subtests (0: any).
	expect      int
	expectTests []string
}

// result is one kernel's outcome.
type result struct {
	k        kernel
	out      string // its run directory
	err      error  // no result at all
	elapsed  time.Duration
	tests    map[string]string // leaf test -> PASS, FAIL, SKIP
	queue    []string
	steering []string // the connect-time steering the daemons ran: connect, queue (fallen back), - (none asked)
	dps      []string
	console  string // the console's last lines, when something went wrong
	logTail  string // test.log's last lines, when there is no result
	exitCode int
	retried  int               // runs after the first (an int3 artefact's rerun)
	retryWhy string            // why the kernel ran again, if it did
	top      map[string]string // top-level test -> PASS, FAIL, SKIP
	death    string            // the guest kernel's first oops or panic line
	int3     bool              // ... and it is TCG's int3 artefact (see deaths)
	problems []string          // what else makes the kernel fail: tests missing, a wrong count
	// When the test binary panicked (a -test.timeout among them): the
	// panic and the tests it names, the log lines before it, and the test
	// code each goroutine was in.
	panic, before, stuck []string
	// Each test's own lines (its t.Log and t.Error output, and what it
	// printed), to say why a test failed without the log at hand.
	lines map[string]*testLines
}

func (g *guest) test(ctx context.Context, k kernel) *result {
	res := &result{k: k, out: filepath.Join(g.cache, "runs", k.version)}
	start := time.Now()
	defer func() { res.elapsed = time.Since(start) }()
	if err := os.RemoveAll(res.out); err != nil {
		res.err = err
		return res
	}
	if err := os.MkdirAll(res.out, 0o755); err != nil {
		res.err = err
		return res
	}
	wd, _ := os.Getwd()
	env := [][2]string{
		{"GUEST", filepath.Join(wd, "e2e/qemu/guest.sh")},
		{"KVER", k.version},
		{"KDIR", k.dir},
		{"BIN", g.build},
		{"TESTBIN", filepath.Join(g.build, "e2e.test")},
		{"WORKDIR", filepath.Join(wd, "e2e")},
		{"SRC", wd},
		{"CACHE", g.cache},
		{"RUN", g.run},
		{"TIMEOUT", g.timeout.String()},
		{"MODULES", g.modules},
		{"AUTOLOAD", strconv.FormatBool(g.autoload)},
		{"ECHO", map[bool]string{true: "1"}[g.echo]},
	}
	var b strings.Builder
	for _, kv := range env {
		fmt.Fprintf(&b, "%s='%s'\n", kv[0], strings.ReplaceAll(kv[1], "'", `'\''`))
	}
	if err := os.WriteFile(filepath.Join(res.out, "env"), []byte(b.String()), 0o644); err != nil {
		res.err = err
		return res
	}

	accel, cpu := "tcg,thread=multi", g.cpu
	if g.kvm {
		accel, cpu = "kvm", "host"
	}
	args := []string{
		"-accel", accel, "-cpu", cpu, "-smp", strconv.Itoa(g.smp), "-m", strconv.Itoa(g.mem),
		"-display", "none", "-monitor", "none", "-no-reboot", "-nic", "none",
		"-serial", "file:" + filepath.Join(res.out, "console.log"),
		"-device", "virtio-rng-pci",
		"-kernel", filepath.Join(k.dir, "boot", "vmlinuz-"+k.version),
		"-initrd", filepath.Join(k.dir, "initrd.img"),
		"-append", "console=ttyS0 quiet panic=-1",
		"-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
		"-virtfs", "local,path=" + res.out + ",mount_tag=out,security_model=none",
	}
	qctx, cancel := context.WithTimeout(ctx, g.timeout+3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(qctx, "qemu-system-x86_64", args...)
	out, err := cmd.CombinedOutput()
	if qctx.Err() != nil {
		err = fmt.Errorf("qemu: %w", qctx.Err())
	} else if err != nil {
		err = fmt.Errorf("qemu: %w: %s", err, strings.TrimSpace(string(out)))
	}

	g.collect(res, err)
	return res
}

var (
	resultRE = regexp.MustCompile(`^\s*--- (PASS|FAIL|SKIP): (\S+) \(`)
	// go test -v's markers of the test whose lines follow.
	runRE   = regexp.MustCompile(`^=== (?:RUN|CONT|NAME) +(\S+)`)
	queueRE = regexp.MustCompile(`rerouted ready: queue_method="([^"]*)"`)
	steerRE = regexp.MustCompile(`rerouted steering=(connect|queue)\b`)
	// A frame of a goroutine dump in the end-to-end tests' own code.
	stuckRE = regexp.MustCompile(`(/e2e/[^/\s]+_test\.go:\d+)`)
)

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// parse reads go test -v output: each test's result, and what the daemon
// reported when it was ready.
func (r *result) parse(path string) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	all := map[string]string{}
	queues := map[string]bool{}
	steerings := map[string]bool{}
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var recent []string
	r.lines = map[string]*testLines{}
	current := ""
	inPanic := 0 // 1: the panic's own lines; 2: its goroutine dump
	for sc.Scan() {
		line := sc.Text()
		switch {
		case inPanic == 0 && strings.HasPrefix(line, "panic: "):
			inPanic = 1
			r.before = recent
			r.panic = append(r.panic, line)
			continue
		case inPanic == 1 && strings.HasPrefix(line, "goroutine "):
			inPanic = 2
		case inPanic == 1:
			if strings.TrimSpace(line) != "" {
				r.panic = append(r.panic, line)
			}
			continue
		case inPanic == 2:
			if m := stuckRE.FindStringSubmatch(line); m != nil && len(r.stuck) < 12 && !contains(r.stuck, m[1]) {
				r.stuck = append(r.stuck, m[1])
			}
			continue
		}
		if recent = append(recent, line); len(recent) > 25 {
			recent = recent[1:]
		}
		if m := runRE.FindStringSubmatch(line); m != nil {
			current = m[1]
		} else if m := resultRE.FindStringSubmatch(line); m != nil {
			all[m[2]] = m[1]
			// The test, or the test it is a subtest of, has ended: what
			// follows until the next marker (the binary's own summary) is
			// no test's.
			if current == m[2] || strings.HasPrefix(current, m[2]+"/") {
				current = ""
			}
		} else if current != "" && !strings.HasPrefix(line, "=== ") {
			if r.lines[current] == nil {
				r.lines[current] = &testLines{}
			}
			r.lines[current].add(line)
		}
		if m := queueRE.FindStringSubmatch(line); m != nil {
			queues[strings.ToLower(strings.ReplaceAll(m[1], " ", "-"))] = true
		}
		if m := steerRE.FindStringSubmatch(line); m != nil {
			steerings[m[1]] = true
		}
	}
	// Leaves only: a test with subtests counts as its subtests.
	r.tests = map[string]string{}
	r.top = map[string]string{}
	dps := map[string]bool{}
	for name, st := range all {
		leaf, failedBelow := true, false
		for other, ost := range all {
			if strings.HasPrefix(other, name+"/") {
				leaf = false
				failedBelow = failedBelow || ost == "FAIL"
			}
		}
		// A test that failed outside its subtests counts too.
		if leaf || st == "FAIL" && !failedBelow {
			r.tests[name] = st
		}
		if !strings.Contains(name, "/") {
			r.top[name] = st
		}
		if parts := strings.Split(name, "/"); len(parts) > 1 && (parts[1] == "kernel" || parts[1] == "userspace") {
			dps[parts[1]] = true
		}
	}
	r.queue = keys(queues)
	r.steering = keys(steerings)
	r.dps = keys(dps)
}

// testLines keeps a test's first and last lines: a test's error can come
// first, with a long dump after it, or last.
type testLines struct {
	head, tail []string
	skipped    int
}

const headLines, tailLines = 40, 40

func (t *testLines) add(line string) {
	if len(line) > 300 {
		line = line[:300] + "..."
	}
	switch {
	case len(t.head) < headLines:
		t.head = append(t.head, line)
	case len(t.tail) < tailLines:
		t.tail = append(t.tail, line)
	default:
		t.tail = append(t.tail[1:], line)
		t.skipped++
	}
}

func (t *testLines) String() string {
	l := t.head
	if t.skipped > 0 {
		l = append(l[:len(l):len(l)], fmt.Sprintf("... (%d lines)", t.skipped))
	}
	return strings.Join(append(l[:len(l):len(l)], t.tail...), "\n")
}

func keys(m map[string]bool) []string {
	var s []string
	for k := range m {
		s = append(s, k)
	}
	sort.Strings(s)
	if len(s) == 0 {
		return []string{"-"}
	}
	return s
}

func (r *result) count(status string) int {
	n := 0
	for _, st := range r.tests {
		if st == status {
			n++
		}
	}
	return n
}

func (r *result) ok() bool {
	return r.err == nil && r.exitCode == 0 && r.count("FAIL") == 0 && r.count("PASS") > 0 &&
		r.death == "" && len(r.problems) == 0
}

// report is the kernel's line, and what went wrong.
func (r *result) report() string {
	var b strings.Builder
	if r.retryWhy != "" {
		fmt.Fprintf(&b, "kernel %s: %s\n", r.k.version, r.retryWhy)
	}
	if r.err != nil {
		fmt.Fprintf(&b, "kernel %s: no result: %v (time=%.0fs retried=%d)\n", r.k.version, r.err, r.elapsed.Seconds(), r.retried)
	} else {
		fmt.Fprintf(&b, "kernel %s: queue=%s steering=%s datapaths=%s passed=%d failed=%d skipped=%d time=%.0fs retried=%d\n",
			r.k.version, strings.Join(r.queue, ","), strings.Join(r.steering, ","), strings.Join(r.dps, ","),
			r.count("PASS"), r.count("FAIL"), r.count("SKIP"), r.elapsed.Seconds(), r.retried)
	}
	if r.death != "" {
		fmt.Fprintf(&b, "    the guest's kernel died: %s\n", r.death)
	}
	for _, p := range r.problems {
		fmt.Fprintf(&b, "    %s\n", p)
	}
	var failed []string
	for name, st := range r.tests {
		if st == "FAIL" {
			failed = append(failed, name)
		}
	}
	sort.Strings(failed)
	for _, name := range failed {
		fmt.Fprintf(&b, "    FAIL %s\n", name)
		if l := r.lines[name]; l != nil {
			fmt.Fprintf(&b, "      its lines:\n%s", indent(l.String(), "        "))
		}
	}
	if r.err == nil && r.exitCode != 0 && len(failed) == 0 {
		fmt.Fprintf(&b, "    the test binary exited %d\n", r.exitCode)
	}
	if len(r.panic) > 0 {
		fmt.Fprintf(&b, "    the test binary panicked:\n%s", indent(strings.Join(r.panic, "\n"), "      "))
		if len(r.stuck) > 0 {
			fmt.Fprintf(&b, "    test code its goroutines were in: %s\n", strings.Join(r.stuck, " "))
		}
		if len(r.before) > 0 {
			fmt.Fprintf(&b, "    test.log before the panic:\n%s", indent(strings.Join(r.before, "\n"), "      "))
		}
	}
	if !r.ok() {
		fmt.Fprintf(&b, "    logs: %s/test.log, %s/console.log\n", r.out, r.out)
		if r.logTail != "" {
			fmt.Fprintf(&b, "    test.log, last lines:\n%s", indent(r.logTail, "      "))
		}
		if r.console != "" {
			fmt.Fprintf(&b, "    console, last lines:\n%s", indent(r.console, "      "))
		}
	}
	return b.String()
}

func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n") + "\n"
}

func indent(s, pre string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString(pre + l + "\n")
	}
	return b.String()
}

// kvmWorks reports whether QEMU can run a guest with KVM: /dev/kvm opens,
// and a paused machine with the host's CPU starts and keeps running for a
// second. (A nested /dev/kvm can open and then abort QEMU while it sets up
// the virtual CPU: "failed to set MSR".)
func kvmWorks() bool {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return false
	}
	f.Close()
	cmd := exec.Command("qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-S", "-display", "none", "-serial", "none",
		"-monitor", "none", "-nodefaults")
	if err := cmd.Start(); err != nil {
		return false
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case <-done:
		return false // it ended by itself: it could not run the machine
	case <-time.After(time.Second):
		cmd.Process.Kill()
		<-done
		return true
	}
}
