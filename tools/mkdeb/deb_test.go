package main

import (
	"bufio"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// requireEnv turns a skip for a missing tool or privilege into a failure,
// as in rerouted's internal/networld/worldtest (CI sets it).
const requireEnv = "REROUTED_REQUIRE_E2E"

// requireTool skips (or, under requireEnv=1, fails) a test that needs a
// command this host lacks.
func requireTool(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			need(t, "the "+tool+" command (make deps installs it)")
		}
	}
}

func need(t *testing.T, what string) {
	t.Helper()
	msg := "the package test needs " + what
	if os.Getenv(requireEnv) == "1" {
		t.Fatalf("%s, and %s=1 forbids skipping", msg, requireEnv)
	}
	t.Skip(msg)
}

// root is the repository's top directory.
const root = "../.."

// buildPackage builds rerouted as make deb does and packages it.
func buildPackage(t *testing.T) (deb, describe string) {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "rerouted")
	describe = "v1.2.3-4-gabc1234"
	cmd := exec.Command("go", "build", "-trimpath", "-buildmode=pie",
		"-ldflags", "-s -w -X main.version="+describe, "-o", bin, "./cmd/rerouted")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	deb, err := Build(Options{Root: root, Binary: bin, Describe: describe, Out: dir,
		Maintainer: "rerouted maintainers <maintainers@rerouted.invalid>", Date: time.Unix(1796000000, 0).UTC()})
	if err != nil {
		t.Fatal(err)
	}
	return deb, describe
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// The package: its files and their modes and owners, its conffile, its
// control fields, a unit systemd accepts, a configuration the installed
// binary accepts, and no lintian error or warning (but those
// packaging/lintian-overrides explains).
func TestPackage(t *testing.T) {
	requireTool(t, "dpkg-deb", "dpkg", "systemd-analyze", "lintian")
	if os.Geteuid() != 0 {
		// Unpacked by anyone else, the configuration is not root's,
		// and rerouted check refuses it, rightly.
		need(t, "root (the unpacked configuration must be root's)")
	}
	deb, describe := buildPackage(t)
	const version = "1.2.3+4.gabc1234-1"
	if filepath.Base(deb) != "rerouted_"+version+"_amd64.deb" {
		t.Errorf("package file %s", filepath.Base(deb))
	}

	// Files, modes, owners (directories aside).
	want := map[string]string{
		"./usr/sbin/rerouted":                                         "-rwxr-xr-x root/root",
		"./usr/lib/systemd/system/rerouted.service":                   "-rw-r--r-- root/root",
		"./etc/rerouted/rerouted.toml":                                "-rw------- root/root",
		"./usr/share/man/man8/rerouted.8.gz":                          "-rw-r--r-- root/root",
		"./usr/share/man/man5/rerouted.toml.5.gz":                     "-rw-r--r-- root/root",
		"./usr/share/bash-completion/completions/rerouted":            "-rw-r--r-- root/root",
		"./usr/share/doc/rerouted/copyright":                          "-rw-r--r-- root/root",
		"./usr/share/doc/rerouted/changelog.Debian.gz":                "-rw-r--r-- root/root",
		"./usr/share/lintian/overrides/rerouted":                      "-rw-r--r-- root/root",
		"./usr/share/doc/rerouted/examples/rerouted.toml":             "-rw-r--r-- root/root",
		"./usr/share/doc/rerouted/examples/per-user.toml":             "-rw-r--r-- root/root",
		"./usr/share/doc/rerouted/examples/per-service.toml":          "-rw-r--r-- root/root",
		"./usr/share/doc/rerouted/examples/per-destination.toml":      "-rw-r--r-- root/root",
		"./usr/share/doc/rerouted/examples/per-application.toml":      "-rw-r--r-- root/root",
		"./usr/share/doc/rerouted/examples/honor-iptables-marks.toml": "-rw-r--r-- root/root",
		"./usr/share/doc/rerouted/examples/metered-standby.toml":      "-rw-r--r-- root/root",
	}
	got := map[string]string{}
	sc := bufio.NewScanner(strings.NewReader(run(t, "dpkg-deb", "-c", deb)))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 6 {
			continue
		}
		if f[0][0] == 'd' {
			if f[1] != "root/root" || f[0] != "drwxr-xr-x" {
				t.Errorf("directory %s: %s %s", f[5], f[0], f[1])
			}
			continue
		}
		got[f[5]] = f[0] + " " + f[1]
	}
	for p, w := range want {
		if got[p] != w {
			t.Errorf("%s: %q, want %q", p, got[p], w)
		}
	}
	for p := range got {
		if _, ok := want[p]; !ok {
			t.Errorf("unexpected file %s", p)
		}
	}

	// Control fields and the conffile.
	info := run(t, "dpkg-deb", "-I", deb)
	for _, w := range []string{"Package: rerouted\n", "Version: " + version + "\n", "Architecture: amd64\n",
		"Section: net\n", "Depends: libc6 (>= 2."} {
		if !strings.Contains(info, w) {
			t.Errorf("dpkg-deb -I lacks %q:\n%s", w, info)
		}
	}
	if c := run(t, "dpkg-deb", "-I", deb, "conffiles"); c != "/etc/rerouted/rerouted.toml\n" {
		t.Errorf("conffiles %q", c)
	}

	// Installed into a scratch root by dpkg (the maintainer scripts run
	// on this host with DPKG_ROOT set, and must touch nothing outside it).
	dst := t.TempDir()
	for _, d := range []string{"var/lib/dpkg/info", "var/lib/dpkg/updates"} {
		if err := os.MkdirAll(filepath.Join(dst, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dst, "var/lib/dpkg/status"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "dpkg", "--root", dst, "--force-script-chrootless", "--force-depends", "--force-not-root", "-i", deb)
	installed := filepath.Join(dst, "usr/sbin/rerouted")
	conf := filepath.Join(dst, "etc/rerouted/rerouted.toml")
	if out := run(t, installed, "check", "--config", conf); !strings.Contains(out, conf+": ok") {
		t.Errorf("rerouted check on the installed configuration: %s", out)
	}
	if out := run(t, installed, "version"); !strings.HasPrefix(out, "rerouted "+describe+"\n") {
		t.Errorf("rerouted version: %s", out)
	}

	// The unit: what the daemon relies on, and systemd's verdict (with
	// the unpacked binary in place of /usr/sbin/rerouted).
	unit, err := os.ReadFile(filepath.Join(dst, "usr/lib/systemd/system/rerouted.service"))
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"Type=notify\n", "ExecStart=/usr/sbin/rerouted run", "ExecReload=/bin/kill -HUP $MAINPID\n",
		"RestartForceExitStatus=75\n", "SIGUSR2", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF", "CAP_PERFMON",
		"ReadWritePaths=-/sys/fs/bpf\n", "RuntimeDirectory=rerouted\n", "StateDirectory=rerouted\n", "RestrictAddressFamilies=AF_NETLINK "} {
		if !strings.Contains(string(unit), w) {
			t.Errorf("the unit lacks %q", strings.TrimSpace(w))
		}
	}
	if strings.Contains(string(unit), "/usr/local/") {
		t.Error("the unit names /usr/local")
	}
	verify := filepath.Join(t.TempDir(), "rerouted.service")
	if err := os.WriteFile(verify, []byte(strings.ReplaceAll(string(unit), "/usr/sbin/rerouted", installed)), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("systemd-analyze", "verify", verify).CombinedOutput(); err != nil || len(out) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}

	// Removal leaves the conffile (dpkg's rule) and nothing else.
	run(t, "dpkg", "--root", dst, "--force-script-chrootless", "--force-not-root", "-r", "rerouted")
	if _, err := os.Stat(installed); !os.IsNotExist(err) {
		t.Errorf("after removal: %s: %v", installed, err)
	}
	if _, err := os.Stat(conf); err != nil {
		t.Errorf("after removal the conffile is gone: %v", err)
	}

	// lintian: no error, no warning but those overridden.
	cmd := exec.Command("lintian", "--fail-on", "error,warning", "--pedantic", deb)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Errorf("lintian: %v\n%s", err, out)
	}
	if bad := regexp.MustCompile(`(?m)^[EW]: .*$`).FindAllString(string(out), -1); len(bad) > 0 {
		t.Errorf("lintian:\n%s", strings.Join(bad, "\n"))
	}
	t.Logf("lintian (informational tags are not failures):\n%s", out)
}

// The maintainer scripts are valid sh, and enable or start nothing.
func TestMaintainerScripts(t *testing.T) {
	for _, s := range []string{"postinst", "prerm", "postrm"} {
		p := filepath.Join(root, "packaging", s)
		if out, err := exec.Command("sh", "-n", p).CombinedOutput(); err != nil {
			t.Errorf("%s: %v\n%s", s, err, out)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		for _, bad := range []string{"enable", "systemctl start", "restart", "deb-systemd-invoke start"} {
			for _, line := range strings.Split(string(b), "\n") {
				if !strings.HasPrefix(strings.TrimSpace(line), "#") && strings.Contains(line, bad) {
					t.Errorf("%s: %q: the package must not %s what the operator did not ask for", s, line, bad)
				}
			}
		}
	}
	if out, err := exec.Command("bash", "-n", filepath.Join(root, "packaging", "bash_completion")).CombinedOutput(); err != nil {
		t.Errorf("bash_completion: %v\n%s", err, out)
	}
}
