package e2e

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// holder is a client process holding many connections until its stdin
// closes (one process may hold only so many sockets).
type holder struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

// hold starts a holder of n connections and waits until they are open. It
// may run on any goroutine: it reports failure as an error.
func (e *env) hold(n int, addrs string) (*holder, error) {
	cmd := e.w.Host.Command(client, "-connect", addrs, "-many", fmt.Sprint(n), "-timeout", "10s")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	h := &holder{cmd: cmd, stdin: stdin}
	e.t.Cleanup(h.close)
	line, err := bufio.NewReader(out).ReadString('\n')
	if strings.TrimSpace(line) != fmt.Sprintf("open %d", n) {
		return nil, fmt.Errorf("holder of %d printed %q (err %v)", n, line, err)
	}
	return h, nil
}

func (h *holder) close() {
	h.stdin.Close()
	h.cmd.Wait()
}

// Soak: 10,000 concurrent translated connections, then churn (half of them
// close while 5,000 new ones open), then all close: every flow and every
// kernel element is gone again, nothing was dropped and nothing failed.
func TestSoak10kFlows(t *testing.T) {
	if testing.Short() {
		t.Skip("soak test: not in -short runs")
	}
	e := newEnv(t, "kernel", webRule)
	// The production default: sweeps dump every socket. One user opens
	// 10,000 connections at once here: no per-user budget.
	cfg := strings.Replace(fmt.Sprintf(configHead, e.sock, e.dp), `gc_interval = "200ms"`, "gc_interval = \"2s\"\nnew_flows_per_uid = 0", 1)
	if err := os.WriteFile(e.cfg, []byte(cfg+webRule), 0o600); err != nil {
		t.Fatal(err)
	}
	d := e.start()
	began := time.Now()
	step := func(what string) { t.Logf("%6.1fs %s", time.Since(began).Seconds(), what) }
	flows := func() int { return e.elements("tcp_out4") }
	waitFlows := func(want int, what string) {
		t.Helper()
		deadline := time.Now().Add(90 * time.Second) // TIME_WAIT's 60 s where ss -K cannot end it
		for n := flows(); n != want; n = flows() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d flows after 90s", what, n)
			}
			time.Sleep(time.Second) // listing 10,000 elements is not free
		}
		step(what)
	}

	// Two processes at once, 5,000 connections each.
	type held struct {
		h   *holder
		err error
	}
	done := make(chan held, 2)
	for i := 0; i < 2; i++ {
		go func() { h, err := e.hold(5000, "192.0.2.80:80"); done <- held{h, err} }()
	}
	r1, r2 := <-done, <-done
	if r1.err != nil || r2.err != nil {
		t.Fatalf("opening 10,000 connections: %v; %v", r1.err, r2.err)
	}
	a, b := r1.h, r2.h
	step("10,000 connections open")
	if n := flows(); n != 10000 {
		t.Fatalf("%d flows with 10,000 connections open", n)
	}
	if n := len(e.flows()); n != 10000 {
		t.Fatalf("rerouted flows lists %d, want 10,000", n)
	}

	// Churn: 5,000 close (their TIME_WAIT is ended by hand) while 5,000 new
	// ones open.
	closed := make(chan struct{})
	go func() { a.close(); close(closed) }()
	c, err := e.hold(5000, "192.0.2.80:80")
	if err != nil {
		t.Fatal(err)
	}
	<-closed
	step("churned")
	e.endTimeWait("192.0.2.80")
	waitFlows(10000, "10,000 flows after the churn")

	b.close()
	c.close()
	e.endTimeWait("192.0.2.80")
	waitFlows(0, "every flow to go")
	if n := len(e.flows()); n != 0 {
		t.Errorf("rerouted still lists %d flows", n)
	}
	if out := d.Output(); strings.Contains(out, "level=ERROR") {
		t.Errorf("errors during the soak:\n%s", grepLines(out, "level=ERROR"))
	}
	if n := e.counter(e.w.B, "foreign"); n != 0 {
		t.Errorf("ISP B dropped %d packets with a foreign source", n)
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
