package daemon

import (
	"bytes"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rerouted/rerouted/internal/daemon/metrics"
	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/packet"
	"golang.org/x/sys/unix"
)

// refusingKernel refuses, all or nothing as nftables does, a transaction
// holding a change it was told to refuse, with that change's error.
type refusingKernel struct {
	mu     sync.Mutex
	refuse map[flow.Change]error // by flow and direction (seq zero)
}

func (k *refusingKernel) Apply(cs []flow.Change) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, c := range cs {
		if err := k.refuse[flow.Change{Flow: c.Flow, Delete: c.Delete}]; err != nil {
			return err
		}
	}
	return nil
}

// The kernel refuses one flow's elements and another's removal: each is
// counted once (install 1, remove 1, on the metrics page too) and logged;
// a removal of elements that were gone already (ENOENT) is not an error.
func TestInstallAndRemoveErrorsCounted(t *testing.T) {
	var logs bytes.Buffer
	k := &refusingKernel{refuse: map[flow.Change]error{}}
	d := newTestDaemon(slog.New(slog.NewTextHandler(&logs, nil)), k)
	f := func(port uint16) *flow.Flow {
		return &flow.Flow{Key: flow.Key{Proto: ipproto.TCP, Src: netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port),
			Dst: netip.MustParseAddrPort("203.0.113.80:443")}, Mark: 200}
	}
	wire := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr("198.51.100.2"), port) }
	refused, kept, gone := f(1000), f(1001), f(1002)
	k.refuse[flow.Change{Flow: refused}] = unix.ENOSPC
	k.refuse[flow.Change{Flow: kept, Delete: true}] = unix.EBUSY
	k.refuse[flow.Change{Flow: gone, Delete: true}] = unix.ENOENT
	for _, fl := range []*flow.Flow{refused, kept, gone} {
		if !d.inst().Add(fl, wire(fl.Src.Port())) {
			t.Fatalf("flow %v not added", fl.Src)
		}
	}
	d.inst().Flush()
	if d.flows().Get(refused.Key) != nil || d.flows().Get(kept.Key) != kept {
		t.Fatal("the refused flow is still in the table, or another one left it")
	}
	d.inst().Remove(kept)
	d.inst().Remove(gone)
	d.inst().Flush()

	for kind, want := range map[errKind]uint64{errInstall: 1, errRemove: 1, errRepair: 0} {
		if got := d.errors[kind].Load(); got != want {
			t.Errorf("%s errors: %d, want %d", errKindNames[kind], got, want)
		}
	}
	for _, want := range []string{
		`msg="install flow in kernel" src=192.0.2.2:1000`, "err=\"no space left on device\"",
		`msg="remove flow from kernel" src=192.0.2.2:1001`, "err=\"device or resource busy\"",
	} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs.String())
		}
	}
	if strings.Contains(logs.String(), "192.0.2.2:1002") {
		t.Errorf("a removal of elements gone already was logged as an error:\n%s", logs.String())
	}

	// As Prometheus scrapes them: the daemon's own counters, served as
	// /metrics serves its registry.
	reg := prometheus.NewRegistry()
	reg.MustRegister(metrics.ErrorCounters(d.shared.Stats, errKindNames[:], d.errors[:])...)
	srv := httptest.NewServer(promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	defer srv.Close()
	resp, err := http.Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	page, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		`rerouted_errors_total{kind="install"} 1`,
		`rerouted_errors_total{kind="remove"} 1`,
		`rerouted_errors_total{kind="repair"} 0`,
	} {
		if !strings.Contains(string(page), want+"\n") {
			t.Errorf("/metrics lacks %q:\n%s", want, page)
		}
	}
}

// newTestDaemon is a daemon with an installer into k, and nothing else.
func newTestDaemon(log *slog.Logger, k flow.Kernel) *Daemon {
	d := &Daemon{log: log}
	d.shared = &packet.Shared{Log: log, Stats: &packet.Stats{}}
	d.shared.Install = flow.NewInstaller(k, d.installFailed)
	return d
}
