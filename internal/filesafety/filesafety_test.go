package filesafety

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/testenv"
)

// needRoot skips (fails under REROUTED_REQUIRE_E2E=1) a test that must
// chown files.
func needRoot(t *testing.T) {
	t.Helper()
	testenv.NeedRoot(t, "to chown test files")
}

// secureDir is a fresh root-owned 0700 directory (t.TempDir's, under the
// sticky /tmp).
func secureDir(t *testing.T) string {
	t.Helper()
	d := t.TempDir()
	for p := d; p != "/"; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if uid, _ := owner(fi); uid != 0 || (fi.Mode().Perm()&0o022 != 0 && fi.Mode()&os.ModeSticky == 0) {
			testenv.Skip(t, "the test directory's ancestor %s is not root's and safe (%v, uid %d): no baseline", p, fi.Mode(), uid)
		}
	}
	return d
}

// file writes a config file with the given mode and owner.
func file(t *testing.T, dir, name string, mode os.FileMode, uid, gid int) string {
	t.Helper()
	f := filepath.Join(dir, name)
	if err := os.WriteFile(f, []byte("[daemon]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(f, uid, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(f, mode); err != nil { // after chown, which clears nothing we set here
		t.Fatal(err)
	}
	return f
}

func mkdir(t *testing.T, parent, name string, mode os.FileMode, uid int) string {
	t.Helper()
	d := filepath.Join(parent, name)
	if err := os.Mkdir(d, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(d, uid, 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(d, mode); err != nil {
		t.Fatal(err)
	}
	return d
}

// insecure checks that Check rejects f with every string in want
// (and always the file's name and --insecure-config).
func insecure(t *testing.T, f string, want ...string) {
	t.Helper()
	err := Check(f)
	var ie *InsecureFileError
	if !errors.As(err, &ie) {
		t.Fatalf("Check(%s) = %v, want an *InsecureFileError", f, err)
	}
	for _, w := range append([]string{f, "--insecure-config"}, want...) {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("Check(%s): no %q in %q", f, w, err)
		}
	}
}

func secure(t *testing.T, f string) {
	t.Helper()
	if err := Check(f); err != nil {
		t.Errorf("Check(%s) = %v, want nil", f, err)
	}
}

func TestCheckFileSecurityFile(t *testing.T) {
	needRoot(t)
	d := secureDir(t)
	secure(t, file(t, d, "ok.toml", 0o600, 0, 0))
	secure(t, file(t, d, "readable.toml", 0o644, 0, 0))
	secure(t, file(t, d, "rootgroup.toml", 0o660, 0, 0)) // group root may write

	f := file(t, d, "user.toml", 0o600, 4321, 4321)
	insecure(t, f, "owned by uid 4321, not root", "fix: chown root:root "+f+" && chmod 0600 "+f)
	if e := new(InsecureFileError); errors.As(Check(f), &e) && (e.File != f || e.Target != "" || len(e.Problems) != 1) {
		t.Errorf("user.toml: %+v", e)
	}

	f = file(t, d, "world.toml", 0o666, 0, 0)
	insecure(t, f, "mode 0666: others can write it", "chown root:root "+f+" && chmod 0600 "+f)
	f = file(t, d, "group.toml", 0o620, 0, 4321)
	insecure(t, f, "mode 0620: its group can write it")
	f = file(t, d, "both.toml", 0o666, 0, 4321)
	insecure(t, f, "mode 0666: its group and others can write it")
	f = file(t, d, "everything.toml", 0o666, 4321, 4321)
	insecure(t, f, "owned by uid 4321", "mode 0666")

	// A relative name is checked as the absolute one, and named so.
	t.Chdir(d)
	insecure(t, "user.toml", filepath.Join(d, "user.toml"))
	secure(t, "ok.toml")
}

func TestCheckFileSecurityDirectories(t *testing.T) {
	needRoot(t)
	d := secureDir(t)

	open := mkdir(t, d, "open", 0o777, 0)
	f := file(t, open, "c.toml", 0o600, 0, 0)
	insecure(t, f, "directory "+open+" has mode 0777: its group and others can replace files in it", "chmod go-w "+open)

	grp := mkdir(t, d, "grp", 0o770, 0)
	insecure(t, file(t, grp, "c.toml", 0o600, 0, 0), "directory "+grp+" has mode 0770: its group can")

	sticky := mkdir(t, d, "sticky", 0o777|os.ModeSticky, 0)
	secure(t, file(t, sticky, "c.toml", 0o600, 0, 0))

	user := mkdir(t, d, "user", 0o755, 1000)
	f = file(t, user, "c.toml", 0o600, 0, 0)
	insecure(t, f, "directory "+user+" is owned by uid 1000, not root", "chown root:root "+user)

	// Every directory above counts, not only the file's own.
	deep := mkdir(t, user, "deep", 0o700, 0)
	insecure(t, file(t, deep, "c.toml", 0o600, 0, 0), "directory "+user+" is owned by uid 1000")

	// Problems with the directories and the file are all listed.
	f = file(t, open, "bad.toml", 0o666, 4321, 0)
	insecure(t, f, "directory "+open+" has mode 0777", "owned by uid 4321", "mode 0666",
		"chmod go-w "+open+" && chown root:root "+f+" && chmod 0600 "+f)
}

func TestCheckFileSecuritySymlinks(t *testing.T) {
	needRoot(t)
	d := secureDir(t)
	link := func(dir, name, target string) string {
		t.Helper()
		l := filepath.Join(dir, name)
		if err := os.Symlink(target, l); err != nil {
			t.Fatal(err)
		}
		return l
	}
	good := file(t, d, "good.toml", 0o600, 0, 0)
	secure(t, link(d, "to-good.toml", "good.toml"))

	// The target is checked, and named.
	bad := file(t, d, "bad.toml", 0o666, 4321, 0)
	l := link(d, "to-bad.toml", bad)
	insecure(t, l, l+" (a symlink to "+bad+")", "owned by uid 4321", "mode 0666", "chown root:root "+bad+" && chmod 0600 "+bad)
	if e := new(InsecureFileError); !errors.As(Check(l), &e) || e.Target != bad {
		t.Errorf("to-bad.toml: %+v", e)
	}

	// A symlink in a directory others can write: they can point it anywhere.
	open := mkdir(t, d, "open", 0o777, 0)
	l = link(open, "c.toml", good)
	insecure(t, l, "directory "+open+" has mode 0777")

	// A safe symlink to a file in a directory others can write.
	target := file(t, open, "real.toml", 0o600, 0, 0)
	insecure(t, link(d, "to-open.toml", target), "directory "+open+" has mode 0777")

	// A symlinked directory on the way, leading through a directory a user owns.
	user := mkdir(t, d, "user", 0o755, 1000)
	inner := mkdir(t, user, "conf", 0o700, 0)
	file(t, inner, "c.toml", 0o600, 0, 0)
	dirLink := link(d, "conf", "user/conf")
	insecure(t, filepath.Join(dirLink, "c.toml"), "directory "+user+" is owned by uid 1000")

	// A loop, and a missing file, are errors of their own.
	loop := link(d, "loop", "loop")
	if err := Check(loop); err == nil || errors.As(err, new(*InsecureFileError)) {
		t.Errorf("symlink loop: %v", err)
	}
	if err := Check(filepath.Join(d, "missing.toml")); err == nil || !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), "missing.toml") {
		t.Errorf("missing file: %v", err)
	}
}

// Without root the checks that need no chown still work: a file the
// (non-root) caller owns is not root's.
func TestCheckFileSecurityOwnFile(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("covered by the root tests")
	}
	f := filepath.Join(t.TempDir(), "c.toml")
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	insecure(t, f, "not root", "chown root:root")
}
