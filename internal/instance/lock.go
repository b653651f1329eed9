// Package instance makes sure one rerouted runs per network namespace, and
// gives its files on disk (the lock, the control socket) paths no other
// user can tamper with.
//
// A second `rerouted run` (a test configuration, a second unit, a mistyped
// queue number) must not touch the running daemon's table: without a lock it
// would adopt it, fail on the queue, and delete it on its way out. The lock
// is an flock on a file named after the network namespace: the kernel
// releases it when the process dies, however it dies, so a crash or a stop
// for a restart still leaves the table for the next daemon to adopt.
package instance

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// ErrRunning is returned by Acquire when another live process holds the
// lock: another rerouted runs in this network namespace.
var ErrRunning = errors.New("another rerouted is running in this network namespace")

// Dir is where lock files live: the unit's RuntimeDirectory.
const Dir = "/run/rerouted"

// Lock is a held instance lock. It is released when Release is called or
// the process exits.
type Lock struct {
	f    *os.File
	path string
}

// Path is the lock file's path.
func (l *Lock) Path() string { return l.path }

// Acquire takes the lock for table in the caller's network namespace. It
// fails with ErrRunning (naming the holder's pid) if another process holds
// it, and touches nothing else either way.
func Acquire(table string) (*Lock, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &st); err != nil {
		return nil, fmt.Errorf("network namespace: %w", err)
	}
	if err := SecureDir(Dir, true); err != nil {
		return nil, fmt.Errorf("lock directory: %w", err)
	}
	path := filepath.Join(Dir, fmt.Sprintf("%s.netns-%d.lock", table, st.Ino))
	for try := 0; try < 10; try++ {
		f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o644)
		if err != nil {
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			b := make([]byte, 32)
			n, _ := f.ReadAt(b, 0)
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				holder := strings.TrimSpace(string(b[:n]))
				if holder == "" {
					holder = "unknown"
				}
				return nil, fmt.Errorf("%w (pid %s holds %s): stop it first; two daemons would fight over table inet %s", ErrRunning, holder, path, table)
			}
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		// The previous holder unlinks the file on its way out: if it did
		// so between our open and our flock, we hold a lock on a file no
		// one else will open. Try again on the file the path names now.
		var held, now unix.Stat_t
		if unix.Fstat(int(f.Fd()), &held) != nil || unix.Lstat(path, &now) != nil || held.Ino != now.Ino || held.Dev != now.Dev {
			f.Close()
			continue
		}
		// The holder's pid, for the refusal a second daemon prints.
		err = f.Truncate(0)
		if err == nil {
			_, err = f.WriteAt([]byte(strconv.Itoa(os.Getpid())+"\n"), 0)
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: write pid: %w", path, err)
		}
		return &Lock{f: f, path: path}, nil
	}
	return nil, fmt.Errorf("lock %s: the file kept being replaced", path)
}

// Release removes the lock file and releases the lock. (Removing it while
// still holding the lock is what makes the check in Acquire sufficient.)
func (l *Lock) Release() error {
	err := os.Remove(l.path)
	if errors.Is(err, os.ErrNotExist) {
		err = nil
	}
	return errors.Join(err, l.f.Close())
}

// SecureDir checks that dir can hold files only root controls: it and every
// directory above it are owned by root, and none can be written by other
// users, except that an ancestor may be a sticky directory such as /tmp
// (whose entries other users cannot rename or remove). dir itself must not
// be writable by anyone but root at all: a user who can create names in it
// can take a socket's or a lock's name first. With create, a missing dir
// (and missing parents) is created 0755.
func SecureDir(dir string, create bool) error {
	dir, err := filepath.Abs(dir)
	if err != nil {
		return err
	}
	if create {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	for d, last := dir, true; ; d, last = filepath.Dir(d), false {
		var st unix.Stat_t
		if err := unix.Lstat(d, &st); err != nil {
			return fmt.Errorf("%s: %w", d, err)
		}
		switch {
		case st.Mode&unix.S_IFMT == unix.S_IFLNK:
			return fmt.Errorf("%s is a symbolic link; give a real directory", d)
		case st.Mode&unix.S_IFMT != unix.S_IFDIR:
			return fmt.Errorf("%s is not a directory", d)
		case st.Uid != 0:
			return fmt.Errorf("%s is owned by uid %d, not root: another user could replace what rerouted creates there", d, st.Uid)
		case st.Mode&0o022 != 0 && (last || st.Mode&unix.S_ISVTX == 0):
			return fmt.Errorf("%s is writable by other users (mode %04o): another user could take or replace what rerouted creates there", d, st.Mode&0o7777)
		}
		if d == "/" {
			return nil
		}
	}
}
