package control

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rerouted/rerouted/internal/usage"

	"github.com/rerouted/rerouted/internal/testenv"
)

// A user the control socket keeps out is told that root is needed, not
// asked whether the daemon runs; a missing socket still asks that.
func TestDialError(t *testing.T) {
	denied := &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", unix.EACCES)}
	msg := dialError("/run/rerouted/rerouted.sock", denied).Error()
	if !strings.Contains(msg, "the control socket answers root only (run it as root") || strings.Contains(msg, "is rerouted running") {
		t.Errorf("permission denied: %q", msg)
	}
	missing := &net.OpError{Op: "dial", Net: "unix", Err: os.NewSyscallError("connect", unix.ENOENT)}
	if msg := dialError("/run/rerouted/rerouted.sock", missing).Error(); !strings.Contains(msg, "is rerouted running?") || strings.Contains(msg, "root") {
		t.Errorf("no socket: %q", msg)
	}
}

// fakeSource is a daemon with fixed flows and uplinks.
type fakeSource struct {
	flows   []FlowInfo
	uplinks []UplinkInfo
}

func (s fakeSource) Flows(fn func(FlowInfo) error) error {
	for _, fi := range s.flows {
		if err := fn(fi); err != nil {
			return err
		}
	}
	return nil
}

func (s fakeSource) Uplinks() []UplinkInfo { return s.uplinks }
func (s fakeSource) Usage() (usage.Report, error) {
	return usage.Report{Uplinks: []string{"default"}, Rows: []usage.Row{}}, nil
}

// The server streams what its Source lists, and the client reads it back;
// no uplinks is an empty list, not null. (The server answers root only.)
func TestServeAndQuery(t *testing.T) {
	testenv.NeedRoot(t, "the control socket answers root only")
	path := filepath.Join(t.TempDir(), "control.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	src := fakeSource{flows: []FlowInfo{
		{Proto: "tcp", Original: Tuple{Src: netip.MustParseAddr("198.51.100.2"), Dst: netip.MustParseAddr("192.0.2.80"), Sport: 40312, Dport: 80}, Mark: 100, Rule: "web"},
		{Proto: "udp", Original: Tuple{Src: netip.MustParseAddr("198.51.100.2"), Dst: netip.MustParseAddr("192.0.2.53"), Sport: 5000, Dport: 53}, Mark: 200},
	}}
	done := make(chan struct{})
	go func() { defer close(done); Serve(ctx, ln, src, slog.New(slog.NewTextHandler(io.Discard, nil))) }()

	flows, err := QueryFlows(path)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(flows, src.flows) {
		t.Errorf("flows = %+v\nwant %+v", flows, src.flows)
	}
	ups, err := QueryUplinks(path)
	if err != nil || ups == nil || len(ups) != 0 {
		t.Errorf("uplinks = %#v, %v; want an empty list", ups, err)
	}
	var reply FlowsReply
	if err := query(path, "bogus", &reply); err != nil || !strings.Contains(reply.Error, `unknown command "bogus"`) {
		t.Errorf("bogus command: %+v, %v", reply, err)
	}
	cancel()
	<-done
}
