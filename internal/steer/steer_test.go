package steer

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/rerouted/rerouted/internal/connect"
	"github.com/rerouted/rerouted/internal/control"
	"github.com/rerouted/rerouted/internal/events"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
	"github.com/rerouted/rerouted/internal/nftdp"
	"github.com/rerouted/rerouted/internal/nftdp/prefilter"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/testenv"
	"github.com/rerouted/rerouted/internal/uplink"
	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"
)

// isLocal: the host's addresses are, a documentation address is not.
func TestIsLocal(t *testing.T) {
	if !isLocal(netip.MustParseAddr("127.0.0.1")) {
		t.Error("127.0.0.1 is not local")
	}
	if isLocal(netip.MustParseAddr("192.0.2.231")) {
		t.Error("192.0.2.231 (TEST-NET-1) is local")
	}
}

func TestInode(t *testing.T) {
	fi, err := os.Stat("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	if ino := inode(fi); ino == 0 || ino != fi.Sys().(*syscall.Stat_t).Ino {
		t.Fatalf("inode = %d, want %d", ino, fi.Sys().(*syscall.Stat_t).Ino)
	}
}

const conf = `
[[uplink]]
name = "isp-b"
mark = 100
interface = "up0"

[[rule]]
name = "web via isp-b"
uplink = "isp-b"
dport = 80
`

// A Steering, in a network namespace of the test's own: it publishes the
// uplink's address, lists the sockets on it as steered flows, and when
// the uplink is renumbered closes the connections left on the old
// address, counting them; it detaches, and leaves no goroutine behind.
func TestSteeringLifecycle(t *testing.T) {
	testenv.NeedRoot(t, "network namespaces, nftables, a cgroup program")
	if root, err := owner.Cgroup2Mount("/proc/self/mountinfo"); err != nil || root == "" {
		testenv.Skip(t, "no cgroup v2 mount: %v", err)
	}
	defer goleak.VerifyNone(t, goleak.IgnoreCurrent())
	ns := worldtest.NS(t)
	for _, cmd := range [][]string{
		{"ip", "link", "set", "lo", "up"},
		{"ip", "link", "add", "up0", "type", "veth", "peer", "name", "up0p"},
		{"ip", "link", "set", "up0p", "up"},
		{"ip", "link", "set", "up0", "up"},
		{"ip", "addr", "add", "10.1.0.2/24", "dev", "up0"},
		{"ip", "route", "add", "default", "dev", "up0", "table", "100"},
		{"ip", "rule", "add", "fwmark", "100", "lookup", "100"},
	} {
		if out, err := ns.Run(cmd[0], cmd[1:]...); err != nil {
			t.Fatalf("%v: %v: %s", cmd, err, out)
		}
	}
	cfg, err := policy.Parse("test.toml", []byte(conf))
	if err != nil {
		t.Fatal(err)
	}
	moved := prometheus.NewCounterVec(prometheus.CounterOpts{Name: "moved"}, []string{"uplink", "how"})
	err = ns.Do(func() error {
		h, err := netlink.NewHandle()
		if err != nil {
			return err
		}
		defer h.Close()
		var states uplink.States
		if _, err := states.Update(h, cfg.Uplinks, time.Now()); err != nil {
			return err
		}
		if st, _ := states.Get(100, false); !st.Up || st.Src != netip.MustParseAddr("10.1.0.2") {
			t.Errorf("isp-b's IPv4 state %+v: want up, source 10.1.0.2", st)
		}
		dp, err := nftdp.Install(7, 1, false, 0, prefilter.FilterOf(cfg))
		if err != nil {
			return err
		}
		defer dp.Close()
		defer dp.Remove()
		var lookupErrors atomic.Uint64
		s, err := Open(cfg, Deps{Datapath: dp, States: &states, Events: events.NewWriter(io.Discard, 0),
			Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Moved: moved, LookupErrors: &lookupErrors})
		if err != nil {
			return err
		}
		if err := s.Start(cfg, 32768, 60999); err != nil {
			return err
		}
		defer func() {
			if err := s.Stop(false); err != nil {
				t.Errorf("Stop: %v", err)
			}
		}()
		if got := s.uplinks; len(got) != 1 || got[0].Mark != 100 || !got[0].Up4 || got[0].Addr4 != netip.MustParseAddr("10.1.0.2") || got[0].Up6 {
			t.Errorf("published uplinks %+v: want isp-b up in IPv4 at 10.1.0.2 only", got)
		}

		// A connection on the uplink's address: its two sockets are
		// steered flows.
		ln, err := net.Listen("tcp4", "10.1.0.2:0")
		if err != nil {
			return err
		}
		defer ln.Close()
		accepted := make(chan net.Conn, 1)
		go func() {
			c, _ := ln.Accept()
			accepted <- c
		}()
		c, err := (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(10, 1, 0, 2)}}).Dial("tcp4", ln.Addr().String())
		if err != nil {
			return err
		}
		defer c.Close()
		srv := <-accepted
		if srv == nil {
			return errors.New("accept failed")
		}
		defer srv.Close()
		port := uint16(ln.Addr().(*net.TCPAddr).Port)
		var flows []control.FlowInfo
		if err := s.List(cfg, func(f control.FlowInfo) error { flows = append(flows, f); return nil }); err != nil {
			return err
		}
		if len(flows) != 2 {
			t.Errorf("List: %d flows, want the connection's 2 sockets: %+v", len(flows), flows)
		}
		for _, f := range flows {
			if f.Proto != "tcp" || f.Original.Src != netip.MustParseAddr("10.1.0.2") || f.Mark != 100 || f.Dev != "up0" ||
				f.Rule != "at connect (isp-b)" || (f.Original.Dport != port && f.Original.Sport != port) {
				t.Errorf("List: %+v, want a tcp flow of the connection to port %d at connect on isp-b", f, port)
			}
		}

		// Renumbered: the connection on 10.1.0.2 is closed, both ends.
		for _, cmd := range [][]string{
			{"ip", "addr", "add", "10.2.0.3/24", "dev", "up0"}, // not 10.1.0.0/24: a secondary goes with its primary
			{"ip", "addr", "del", "10.1.0.2/24", "dev", "up0"},
		} {
			if out, err := ns.Run(cmd[0], cmd[1:]...); err != nil {
				return errors.New(err.Error() + ": " + out)
			}
		}
		if _, err := states.Update(h, cfg.Uplinks, time.Now()); err != nil {
			return err
		}
		if err := s.Publish(cfg); err != nil {
			return err
		}
		if got := s.uplinks[0].Addr4; got != netip.MustParseAddr("10.2.0.3") {
			t.Errorf("published address %s after renumbering, want 10.2.0.3", got)
		}
		if n := testutil.ToFloat64(moved.WithLabelValues("isp-b", "reset")); n != 2 || lookupErrors.Load() != 0 {
			t.Errorf("moved{isp-b,reset} = %v, lookup errors %d: want 2, 0", n, lookupErrors.Load())
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNABORTED) {
			t.Errorf("read from the connection on the old address: %v, want ECONNABORTED", err)
		}

		// Its counts: one per result.
		if n := testutil.CollectAndCount(collector{s}); n != 7 {
			t.Errorf("Collect gave %d metrics, want 7", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

type collector struct{ s *Steering }

func (c collector) Describe(ch chan<- *prometheus.Desc) { ch <- Desc }
func (c collector) Collect(ch chan<- prometheus.Metric) { c.s.Collect(ch) }

// No cgroup v2 mount is a host without the feature, named in the error;
// a mountinfo that cannot be read is a fault.
func TestCgroupRootClassifies(t *testing.T) {
	dir := t.TempDir()
	with := dir + "/with"
	without := dir + "/without"
	if err := os.WriteFile(with, []byte("35 1 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(without, []byte("22 1 0:21 / /proc rw - proc proc rw\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if root, err := cgroupRoot(with); err != nil || root != "/sys/fs/cgroup" {
		t.Errorf("with cgroup2: %q, %v", root, err)
	}
	_, err := cgroupRoot(without)
	var ue *connect.UnsupportedError
	if !errors.As(err, &ue) || ue.Reason != connect.ReasonNoCgroup2 {
		t.Errorf("without cgroup2: %v, want an UnsupportedError for %q", err, connect.ReasonNoCgroup2)
	}
	if _, err := cgroupRoot(dir + "/missing"); err == nil || errors.Is(err, connect.ErrUnsupported) {
		t.Errorf("unreadable mountinfo: %v, want an error other than ErrUnsupported", err)
	}
}

// Connect-time steering that does not start leaves every flow to the
// queue either way; what the host is expected to lack is a warning naming
// it, anything else (a verifier's refusal) an error.
func TestLogFailureLevels(t *testing.T) {
	for _, c := range []struct {
		err   error
		level string
		want  string
	}{
		{fmt.Errorf("open: %w", &connect.UnsupportedError{Reason: connect.ReasonKernel, Err: errors.New("protocol not available")}),
			"level=WARN", `msg="connect-time steering is not available: every new flow is decided at the queue" reason="` + connect.ReasonKernel + `"`},
		{&connect.UnsupportedError{Reason: connect.ReasonNoCgroup2, Err: errors.New("no cgroup2 mount")},
			"level=WARN", `reason="` + connect.ReasonNoCgroup2 + `"`},
		{fmt.Errorf("the verifier refused the program: %w", &ebpf.VerifierError{}),
			"level=ERROR", `msg="connect-time steering failed: every new flow is decided at the queue"`},
		{errors.New("attach connect4 at /sys/fs/cgroup: operation not permitted"),
			"level=ERROR", `msg="connect-time steering failed`},
	} {
		var b bytes.Buffer
		LogFailure(slog.New(slog.NewTextHandler(&b, nil)), c.err)
		if out := b.String(); !strings.Contains(out, c.level) || !strings.Contains(out, c.want) {
			t.Errorf("%v: logged %q, want %s with %s", c.err, out, c.level, c.want)
		}
	}
}
