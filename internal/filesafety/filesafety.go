// Package filesafety checks that only root can change a file a root daemon
// reads its configuration from.
package filesafety

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// InsecureFileError is what Check returns for a configuration
// file that users other than root could change: a root daemon that read it
// would route (and translate) as they say.
type InsecureFileError struct {
	File     string   // the file as named, absolute
	Target   string   // the file a symlink leads to; "" if File is not one
	Problems []string // each thing wrong, worded for a person
	Fixes    []string // a command for each thing wrong
}

// Problem names the file and what is wrong with it.
func (e *InsecureFileError) Problem() string {
	name := e.File
	if e.Target != "" {
		name += " (a symlink to " + e.Target + ")"
	}
	return fmt.Sprintf("configuration file %s can be changed by users other than root: %s", name, strings.Join(e.Problems, "; "))
}

// Fix says how to make the file safe, or to accept it as it is.
func (e *InsecureFileError) Fix() string {
	return strings.Join(e.Fixes, " && ") + " (or pass --insecure-config to use it anyway)"
}

func (e *InsecureFileError) Error() string { return e.Problem() + "; fix: " + e.Fix() }

// Check checks, as sshd's StrictModes does, that only root can
// change the configuration file at path: the file (where a symlink leads,
// if path is one) must be owned by root and writable by nobody else (its
// group may write it if that group is root), and every directory a name is
// looked up in on the way to it, from / down, must be owned by root and not
// writable by group or others, unless it is sticky (as /tmp is). It returns
// an *InsecureFileError listing every problem and its fix, or another error
// if the path cannot be examined.
func Check(path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("cannot check who can change configuration file %s: %w", path, err)
	}
	resolved, dirs, err := resolve(abs)
	if err != nil {
		return fmt.Errorf("cannot check who can change configuration file %s: %w (--insecure-config skips this check)", abs, err)
	}
	e := &InsecureFileError{File: abs}
	if resolved != abs {
		e.Target = resolved
	}
	for _, d := range dirs {
		fi, err := os.Lstat(d)
		if err != nil {
			return fmt.Errorf("cannot check who can change configuration file %s: %w (--insecure-config skips this check)", abs, err)
		}
		uid, _ := owner(fi)
		var fix []string
		if uid != 0 {
			e.Problems = append(e.Problems, fmt.Sprintf("directory %s is owned by uid %d, not root", d, uid))
			fix = append(fix, "chown root:root "+d)
		}
		if fi.Mode().Perm()&0o022 != 0 && fi.Mode()&fs.ModeSticky == 0 {
			e.Problems = append(e.Problems, fmt.Sprintf("directory %s has mode %04o: %s can replace files in it (and it is not sticky)", d, fi.Mode().Perm(), writers(fi.Mode().Perm(), false)))
			fix = append(fix, "chmod go-w "+d)
		}
		e.Fixes = append(e.Fixes, fix...)
	}
	fi, err := os.Lstat(resolved)
	if err != nil {
		return fmt.Errorf("cannot check who can change configuration file %s: %w (--insecure-config skips this check)", abs, err)
	}
	uid, gid := owner(fi)
	bad := false
	if uid != 0 {
		e.Problems = append(e.Problems, fmt.Sprintf("it is owned by uid %d, not root", uid))
		bad = true
	}
	perm := fi.Mode().Perm()
	if perm&0o002 != 0 || (perm&0o020 != 0 && gid != 0) {
		e.Problems = append(e.Problems, fmt.Sprintf("it has mode %04o: %s can write it", perm, writers(perm, gid == 0)))
		bad = true
	}
	if bad {
		e.Fixes = append(e.Fixes, fmt.Sprintf("chown root:root %s && chmod 0600 %s", resolved, resolved))
	}
	if len(e.Problems) > 0 {
		return e
	}
	return nil
}

// writers says who, besides the owner, can write a file with mode perm;
// rootGroup: the group is root, which is not counted.
func writers(perm fs.FileMode, rootGroup bool) string {
	group := perm&0o020 != 0 && !rootGroup
	switch others := perm&0o002 != 0; {
	case group && others:
		return "its group and others"
	case group:
		return "its group"
	default:
		return "others"
	}
}

func owner(fi fs.FileInfo) (uid, gid uint32) {
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Uid, st.Gid
	}
	return ^uint32(0), ^uint32(0)
}

// resolve follows abs (absolute and clean) as the kernel does, and returns
// the file it leads to (no symlink left) and every directory a name is
// looked up in on the way, in order: whoever can write one of them can
// point the path elsewhere, through whichever symlink.
func resolve(abs string) (resolved string, dirs []string, err error) {
	seen := map[string]bool{}
	lookup := func(d string) {
		if !seen[d] {
			seen[d] = true
			dirs = append(dirs, d)
		}
	}
	rest := strings.Split(strings.TrimPrefix(abs, "/"), "/")
	cur := "/"
	for links := 0; len(rest) > 0; {
		c := rest[0]
		rest = rest[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			cur = filepath.Dir(cur)
			continue
		}
		lookup(cur)
		next := filepath.Join(cur, c)
		fi, err := os.Lstat(next)
		if err != nil {
			return "", nil, err
		}
		if fi.Mode()&fs.ModeSymlink == 0 {
			cur = next
			continue
		}
		if links++; links > 40 {
			return "", nil, &fs.PathError{Op: "resolve", Path: abs, Err: syscall.ELOOP}
		}
		target, err := os.Readlink(next)
		if err != nil {
			return "", nil, err
		}
		if filepath.IsAbs(target) {
			cur = "/"
		}
		rest = append(strings.Split(target, "/"), rest...)
	}
	if cur == "/" {
		return "", nil, errors.New("the root directory is not a file")
	}
	return cur, dirs, nil
}
