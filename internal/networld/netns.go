// Package networld builds a small multi-ISP world out of network namespaces
// for rerouted's tests, benchmarks and demo: a host with two uplinks, two ISPs
// that drop packets whose source is not their customer's (BCP38), and an
// "internet" namespace with servers. It uses the ip and nft commands, as an
// operator would; rerouted itself never does.
//
// Everything lives in namespaces named after a unique prefix; nothing is
// created in the caller's namespace, and Close removes it all.
package networld

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// NS is one named network namespace.
type NS struct {
	Name string
}

// NewNS creates a namespace with its loopback up.
func NewNS(name string) (*NS, error) {
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %v: %s", name, err, bytes.TrimSpace(out))
	}
	ns := &NS{Name: name}
	if err := ns.IP("link set lo up"); err != nil {
		ns.Delete()
		return nil, err
	}
	// Without duplicate address detection, link-local addresses are
	// usable at once and IPv6 neighbour discovery works from the first
	// packet (real hosts finished DAD long before).
	if err := ns.Sysctl("net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"); err != nil {
		ns.Delete()
		return nil, err
	}
	return ns, nil
}

// Delete removes the namespace; its interfaces go with it.
func (n *NS) Delete() error {
	out, err := exec.Command("ip", "netns", "del", n.Name).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip netns del %s: %v: %s", n.Name, err, bytes.TrimSpace(out))
	}
	return nil
}

// IP runs `ip -n NS -batch -` with one command per line.
func (n *NS) IP(lines ...string) error { return n.ip(nil, lines) }

// IP6 is IP for IPv6 (`ip -6`).
func (n *NS) IP6(lines ...string) error { return n.ip([]string{"-6"}, lines) }

func (n *NS) ip(opts, lines []string) error {
	cmd := exec.Command("ip", append(opts, "-n", n.Name, "-batch", "-")...)
	cmd.Stdin = strings.NewReader(strings.Join(lines, "\n") + "\n")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("in %s: ip %q: %v: %s", n.Name, lines, err, bytes.TrimSpace(out))
	}
	return nil
}

// Command returns a command that runs in the namespace. It enters only the
// network namespace: unlike `ip netns exec`, which remounts /sys privately,
// the program sees the host's mounts, the cgroup v2 hierarchy included, as a
// service on a real host does.
func (n *NS) Command(name string, args ...string) *exec.Cmd {
	return exec.Command("nsenter", n.nsenter(name, args)...)
}

// nsenter is the argument list that runs name with args in the namespace.
func (n *NS) nsenter(name string, args []string) []string {
	return append([]string{"--net=/run/netns/" + n.Name, "--", name}, args...)
}

// commandTimeout bounds Run and Nft: a command that hangs (nft, whose
// listing restarts while the ruleset keeps changing, among them) fails the
// test with its name rather than stalling it until the test binary's
// timeout.
const commandTimeout = 2 * time.Minute

func (n *NS) boundedCommand(name string, args ...string) (*exec.Cmd, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(context.Background(), commandTimeout)
	return exec.CommandContext(ctx, "nsenter", n.nsenter(name, args)...), cancel
}

// Run runs a command in the namespace and returns its standard output.
func (n *NS) Run(name string, args ...string) (string, error) {
	var stdout, stderr bytes.Buffer
	cmd, cancel := n.boundedCommand(name, args...)
	defer cancel()
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("in %s: %s %s: %v: %s", n.Name, name, strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return stdout.String(), nil
}

// Nft loads an nft script into the namespace.
func (n *NS) Nft(script string) error {
	cmd, cancel := n.boundedCommand("nft", "-f", "-")
	defer cancel()
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("in %s: nft: %v: %s", n.Name, err, bytes.TrimSpace(out))
	}
	return nil
}

// Sysctl sets net sysctls (key=value) in the namespace.
func (n *NS) Sysctl(kv ...string) error {
	_, err := n.Run("sysctl", append([]string{"-qw"}, kv...)...)
	return err
}

// Do runs fn on an OS thread that has entered the namespace. Sockets fn
// creates belong to the namespace and can be used from any goroutine
// afterwards. The thread is discarded when fn returns.
func (n *NS) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		// No UnlockOSThread: the thread has the wrong namespace for anyone
		// else, so the runtime must throw it away when this goroutine ends.
		f, err := os.Open("/run/netns/" + n.Name)
		if err != nil {
			errc <- err
			return
		}
		err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
		f.Close()
		if err != nil {
			errc <- fmt.Errorf("setns %s: %w", n.Name, err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}
