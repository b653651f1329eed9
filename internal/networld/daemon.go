package networld

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Daemon is a rerouted process running in the host namespace.
type Daemon struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // exit status, valid after done

	mu    sync.Mutex
	lines []string
	cond  *sync.Cond
}

// StartDaemon runs `bin run --config config args...` in the host namespace
// (entered before the program starts, as for any service).
// Every output line is kept, and copied to echo if it is not nil.
func (w *World) StartDaemon(bin, config string, echo io.Writer, args ...string) (*Daemon, error) {
	return w.StartDaemonEnv(bin, config, nil, echo, args...)
}

// StartDaemonEnv is StartDaemon with extra environment variables.
func (w *World) StartDaemonEnv(bin, config string, env []string, echo io.Writer, args ...string) (*Daemon, error) {
	d := &Daemon{done: make(chan struct{})}
	d.cond = sync.NewCond(&d.mu)
	argv := append([]string{bin, "run", "--config", config}, args...)
	if len(w.DaemonPrefix) > 0 {
		argv = append(append([]string(nil), w.DaemonPrefix...), argv...)
	}
	d.cmd = w.Host.Command(argv[0], argv[1:]...)
	// The daemon keeps its state (usage.json) where systemd's
	// StateDirectory= would say: the world's own directory, unless the
	// caller says otherwise, never the host's /var/lib/rerouted.
	d.cmd.Env = append(os.Environ(), "STATE_DIRECTORY="+w.StateDir)
	d.cmd.Env = append(d.cmd.Env, env...)
	pr, pw := io.Pipe()
	d.cmd.Stdout, d.cmd.Stderr = pw, pw
	if err := d.cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", bin, err)
	}
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			line := sc.Text()
			if echo != nil {
				fmt.Fprintln(echo, line)
			}
			d.mu.Lock()
			d.lines = append(d.lines, line)
			d.cond.Broadcast()
			d.mu.Unlock()
		}
	}()
	go func() {
		d.err = d.cmd.Wait()
		pw.Close()
		close(d.done)
		d.mu.Lock()
		d.cond.Broadcast()
		d.mu.Unlock()
	}()
	return d, nil
}

// WaitFor waits until an output line contains s, and returns it.
func (d *Daemon) WaitFor(s string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	t := time.AfterFunc(timeout, func() { d.mu.Lock(); d.cond.Broadcast(); d.mu.Unlock() })
	defer t.Stop()
	d.mu.Lock()
	defer d.mu.Unlock()
	for seen := 0; ; {
		for ; seen < len(d.lines); seen++ {
			if strings.Contains(d.lines[seen], s) {
				return d.lines[seen], nil
			}
		}
		select {
		case <-d.done:
			return "", fmt.Errorf("rerouted exited (%v) before printing %q", d.err, s)
		default:
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("rerouted did not print %q within %s", s, timeout)
		}
		d.cond.Wait()
	}
}

// WaitReady waits for the daemon's "ready" log line, for ReadyTimeout:
// a test that calls it asserts that the daemon starts that fast.
func (d *Daemon) WaitReady() error { return d.WaitReadyWithin(ReadyTimeout()) }

// WaitReadyWithin waits for the daemon's "ready" log line for timeout
// (the lab's benchmarks, on a host kept busy on purpose, allow 30 s).
func (d *Daemon) WaitReadyWithin(timeout time.Duration) error {
	_, err := d.WaitFor("msg=ready", timeout)
	return err
}

// ReadyTimeout is how long a daemon may take to start: natively it is
// ready in well under a second, so 2 s; in a kernel matrix guest
// (REROUTED_E2E_GUEST=1, testenv.GuestEnv), where QEMU may emulate the CPU
// and the verifier's pass over the connect-time program alone can take
// ten, 30 s.
func ReadyTimeout() time.Duration {
	if os.Getenv("REROUTED_E2E_GUEST") == "1" {
		return 30 * time.Second
	}
	return 2 * time.Second
}

// Lines returns every line printed so far.
func (d *Daemon) Lines() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.lines...)
}

// Output returns everything printed so far.
func (d *Daemon) Output() string { return strings.Join(d.Lines(), "\n") }

// PID is the daemon's process id (nsenter execs it in place).
func (d *Daemon) PID() int { return d.cmd.Process.Pid }

// Signal sends sig to the daemon.
func (d *Daemon) Signal(sig syscall.Signal) error { return d.cmd.Process.Signal(sig) }

// Wait waits for the daemon to exit and returns its exit error.
func (d *Daemon) Wait(timeout time.Duration) error {
	select {
	case <-d.done:
		return d.err
	case <-time.After(timeout):
		return fmt.Errorf("rerouted still running after %s", timeout)
	}
}

// Stop sends SIGTERM and waits for a clean exit.
func (d *Daemon) Stop() error {
	select {
	case <-d.done:
		return d.err
	default:
	}
	if err := d.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	return d.Wait(15 * time.Second)
}

// Kill sends SIGKILL and waits for the process to be gone.
func (d *Daemon) Kill() {
	d.cmd.Process.Kill()
	<-d.done
}
