package instance

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// ErrInsecure is returned for a control socket path in a place other users
// can write to: rerouted refuses it rather than create files there.
var ErrInsecure = errors.New("refusing an insecure path")

// ListenControl creates the control socket at path, mode 0600, without ever
// following a link or changing the mode of anything but the socket it
// created: the mode is set on the socket before bind creates its file
// (the kernel gives the file the socket's mode), and bind never follows
// links. The directory must be root's alone (see SecureDir); a missing one
// is created 0755.
//
// What is found at path first:
//   - a socket owned by root that answers: another daemon (in another
//     network namespace; the instance lock rules out this one) is using
//     the path. An error.
//   - a socket owned by root that does not answer: stale (a crash), replaced.
//   - anything owned by another user: reported and replaced, never obeyed.
//   - anything else (a root file, a link): an error; rerouted does not
//     remove what may not be its own.
func ListenControl(path string, log *slog.Logger) (net.Listener, error) {
	dir := filepath.Dir(path)
	if err := SecureDir(dir, true); err != nil {
		return nil, fmt.Errorf("control socket %s: %w: %w", path, ErrInsecure, err)
	}
	var st unix.Stat_t
	switch err := unix.Lstat(path, &st); {
	case errors.Is(err, unix.ENOENT):
	case err != nil:
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	case st.Uid != 0:
		log.Warn("control socket path was taken by another user: removed, not used", "path", path, "uid", st.Uid,
			"type", fileType(st.Mode))
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("control socket %s: remove what uid %d left there: %w", path, st.Uid, err)
		}
	case st.Mode&unix.S_IFMT != unix.S_IFSOCK:
		return nil, fmt.Errorf("control socket %s: a %s owned by root is there; remove it or choose another control_socket", path, fileType(st.Mode))
	default:
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("control socket %s: %w: another rerouted answers on it (in another network namespace?); give each its own control_socket", path, ErrRunning)
		}
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("control socket %s: remove the stale socket: %w", path, err)
		}
		log.Info("replaced a stale control socket", "path", path)
	}

	fd, err := unix.Socket(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close() // FileListener dups it
	if err := unix.Fchmod(fd, 0o600); err != nil {
		return nil, fmt.Errorf("control socket: set mode before bind: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	if err := unix.Listen(fd, 64); err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	ln, err := net.FileListener(f)
	if err != nil {
		os.Remove(path)
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false) // the daemon removes it, once
	return ln, nil
}

func fileType(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFSOCK:
		return "socket"
	case unix.S_IFLNK:
		return "symbolic link"
	case unix.S_IFDIR:
		return "directory"
	case unix.S_IFREG:
		return "file"
	}
	return "special file"
}
