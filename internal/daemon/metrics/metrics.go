// Package metrics is the daemon's Prometheus metrics (/metrics): the
// counters the packet path and the daemon keep, read at scrape time; the
// flow table, the uplinks' states, the kernel's queue and per-user counts,
// read at scrape time; and the decisions, repairs, moves and uplink
// transitions, counted as they happen.
package metrics

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/nftdp"
	"github.com/rerouted/rerouted/internal/packet"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/steer"
	"github.com/rerouted/rerouted/internal/uplink"
)

// Metrics are the daemon's Prometheus metrics. Counters the packet path
// already keeps (stats) are read at scrape time; flows are counted from the
// table at scrape time; decisions are counted and timed as they happen.
type Metrics struct {
	reg         *prometheus.Registry
	Decisions   *prometheus.CounterVec // by rule
	Latency     prometheus.Histogram   // first packet in, verdict decided
	Repairs     *prometheus.CounterVec // by what was put back
	Moved       *prometheus.CounterVec // flows whose source address went away, by uplink and how
	Transitions *prometheus.CounterVec // uplink state changes
}

// Daemon is what the metrics read of the daemon at scrape time.
type Daemon struct {
	Log        *slog.Logger
	Config     *atomic.Pointer[policy.Config]
	Stats      *packet.Stats // the packet path's counts
	FailClosed bool
	// ErrorKinds names the daemon's own errors, counted in Errors.
	ErrorKinds      []string
	Errors          []atomic.Uint64
	Idle, UDPClosed *atomic.Uint64
	Flows           func() *flow.Table
	Uplinks         *uplink.States
	Steer           *atomic.Pointer[steer.Steering] // holds nil when steering is off
	Datapath        func() *nftdp.Datapath          // once the table is open
	// Usage is the usage accounting's metrics (package usage).
	Usage prometheus.Collector
}

// New registers the metrics of d.
func New(d *Daemon) *Metrics {
	m := &Metrics{
		reg: prometheus.NewRegistry(),
		// rule: the rule's name, "host mark", or "none" (the normal route).
		Decisions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rerouted_decisions_total",
			Help: "New flows decided, by the rule that decided them."}, []string{"rule"}),
		// Its decision: the socket, the owner, the policy, the route, the port.
		Latency: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "rerouted_decision_seconds",
			Help:    "Time from a new flow's first packet at the daemon to its decision.",
			Buckets: prometheus.ExponentialBuckets(5e-6, 2.5, 12)}),
		// what: of the nft table, table, chain, set, rule, element, foreign
		// or check; of managed routing, route or ip_rule.
		Repairs: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rerouted_repairs_total",
			Help: "Repairs of rerouted's table or routing after another program changed it."}, []string{"what"}),
		// how: redecided (UDP and ping flows, with the uplink's new
		// address), reset (TCP connections), removed (with reset_tcp =
		// false, or a socket that cannot be reset: the translation only).
		Moved: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rerouted_flows_moved_total",
			Help: "Flows whose source address went away, by uplink and how they moved."}, []string{"uplink", "how"}),
		Transitions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "rerouted_uplink_transitions_total",
			Help: "Uplink state changes (up to down or back), by uplink and family."}, []string{"uplink", "family"}),
	}
	m.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		m.Decisions, m.Latency, m.Repairs, m.Moved, m.Transitions, &uplinkCollector{d: d}, &budgetCollector{d: d}, &flowCollector{d: d}, &queueCollector{d: d}, steeringCollector{d: d})
	if d.Usage != nil {
		m.reg.MustRegister(d.Usage)
	}
	for _, c := range []struct {
		name, help string
		v          func() uint64
	}{
		{"rerouted_syns_total", "TCP SYNs decided.", d.Stats.SYNs.Load},
		{"rerouted_datagram_flows_total", "UDP and echo flows decided.", d.Stats.Datagrams.Load},
		{"rerouted_translated_total", "New flows translated.", d.Stats.Translated.Load},
		// Sent on raw sockets (traceroute -T, SYN scans): decided by the
		// rules without owner keys; their flows end by idleness.
		{"rerouted_raw_syns_total", "SYNs no TCP socket owns (raw sockets).", d.Stats.RawSYNs.Load},
		{"rerouted_retransmitted_syns_total", "Retransmitted SYNs of translated flows.", d.Stats.Retrans.Load},
		{"rerouted_dropped_packets_total", "Packets the daemon dropped (their sockets retry).", d.Stats.Dropped.Load},
		// A service's socket: unconnected, bound outside the ephemeral ports.
		{"rerouted_service_datagram_flows_total", "UDP flows from a local service's socket, decided by owner rules only.", d.Stats.Service.Load},
		{"rerouted_refused_total", "New flows refused: every uplink of their rule was down (on_down = \"drop\").", d.Stats.Refused.Load},
		{"rerouted_icmp_errors_readdressed_total", "ICMP errors readdressed to a translated flow's socket.", d.Stats.ICMPErrors.Load},
		{"rerouted_udp_socket_closed_total", "UDP flows ended as the kernel announced their socket's end.", d.UDPClosed.Load},
		{"rerouted_tcp_socket_closed_total", "TCP flows ended as the kernel announced their socket's end (and no TIME_WAIT socket kept its tuple).", d.Stats.TCPClosed.Load},
		{"rerouted_idle_ended_total", "UDP and echo flows ended by idleness.", d.Idle.Load},
		{"rerouted_forwarded_packets_total", "Userspace datapath: packets rewritten after the first.", d.Stats.Forwarded.Load},
		{"rerouted_forwarded_bytes_total", "Userspace datapath: their bytes.", d.Stats.Bytes.Load},
		// Each is a new generation of the host's ruleset, which restarts an
		// nft listing in progress.
		{"rerouted_flow_transactions_total", "nftables transactions that installed or removed flows' elements.", func() uint64 { return d.Datapath().Transactions() }},
	} {
		v := c.v
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: c.name, Help: c.help}, func() float64 { return float64(v()) }))
	}
	// The new source went away when an uplink was renumbered.
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "rerouted_stale_source_drops_total",
		Help: "Translated packets the kernel dropped: their new source is no longer the host's."},
		func() float64 {
			n, err := d.Datapath().StaleDrops()
			if err != nil {
				d.Log.Error("metrics: read the stale-source counter", "err", err)
			}
			return float64(n)
		}))
	mode := "open"
	if d.FailClosed {
		mode = "closed"
	}
	for r := packet.FailReason(0); r < packet.FailReasons; r++ {
		name := "rerouted_failed_" + mode + "_total"
		help := "New flows the policy concerns that could not be decided as it says, by reason."
		if mode == "closed" || r == packet.FailNoPort {
			name = "rerouted_failed_closed_total"
		}
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help,
			ConstLabels: prometheus.Labels{"reason": packet.FailReasonNames[r]}},
			func() float64 { return float64(d.Stats.Failed[r].Load()) }))
	}
	// The kernel fails open silently when the queue (or the socket's
	// buffer) is full: what the prefilter offered the queue and the
	// daemon never received. Exact when no burst is in flight; latched so
	// that it never goes down.
	queueFullName := "rerouted_failed_open_total"
	if d.FailClosed {
		queueFullName = "rerouted_failed_closed_total"
	}
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: queueFullName,
		Help: "New flows the policy concerns that could not be decided as it says, by reason.", ConstLabels: prometheus.Labels{"reason": "queue_full"}},
		func() float64 {
			offered, err := d.Datapath().Offered()
			if err != nil {
				d.Log.Error("metrics: read the queue rules' counters", "err", err)
			}
			if got := d.Stats.Received.Load(); offered > got {
				for {
					old := d.Stats.QueueFull.Load()
					if offered-got <= old || d.Stats.QueueFull.CompareAndSwap(old, offered-got) {
						break
					}
				}
			}
			return float64(d.Stats.QueueFull.Load())
		}))
	// New flows by who decided them: the kernel's rules (host marks),
	// the daemon (at the queue), the connect-time program.
	for _, c := range []struct {
		by string
		v  func() uint64
	}{
		{"kernel", d.Stats.KernelDecided.Load},
		{"daemon", d.Stats.Translated.Load},
		{"connect", func() uint64 {
			if s := d.Steer.Load(); s != nil {
				return s.Steered()
			}
			return 0
		}},
	} {
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "rerouted_flows_total",
			Help: "New translated or steered flows, by who decided them.", ConstLabels: prometheus.Labels{"decided_by": c.by}},
			func() float64 { return float64(c.v()) }))
	}
	for r := packet.ExceptionReason(0); r < packet.ExceptionReasons; r++ {
		m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "rerouted_kernel_exceptions_total",
			Help: "Host-marked first packets the kernel left to the daemon, by reason.", ConstLabels: prometheus.Labels{"reason": packet.ExceptionReasonNames[r]}},
			func() float64 { return float64(d.Stats.Exceptions[r].Load()) }))
	}
	m.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "rerouted_kernel_moved_total",
		Help: "Kernel-decided flows moved to another port: a socket owned their wire tuple."},
		func() float64 { return float64(d.Stats.Moved.Load()) }))
	m.reg.MustRegister(ErrorCounters(d.Stats, d.ErrorKinds, d.Errors)...)
	return m
}

// ErrorCounters are rerouted_errors_total, one per kind, read at scrape
// time: the packet path's kinds from stats, then the daemon's own, named
// by kinds and counted in counts.
func ErrorCounters(stats *packet.Stats, kinds []string, counts []atomic.Uint64) []prometheus.Collector {
	var cs []prometheus.Collector
	counter := func(kind string, n *atomic.Uint64) {
		cs = append(cs, prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "rerouted_errors_total",
			Help: "Errors, by kind.", ConstLabels: prometheus.Labels{"kind": kind}},
			func() float64 { return float64(n.Load()) }))
	}
	for k := packet.ErrKind(0); k < packet.ErrKinds; k++ {
		counter(packet.ErrKindNames[k], &stats.Errors[k])
	}
	for k := range counts {
		counter(kinds[k], &counts[k])
	}
	return cs
}

// Serve serves /metrics on ln until ctx is done.
func (m *Metrics) Serve(ctx context.Context, ln net.Listener, log *slog.Logger) {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{ErrorLog: slogPrinter{log}}))
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error("metrics server", "err", err)
	}
}

type slogPrinter struct{ log *slog.Logger }

func (p slogPrinter) Println(v ...any) { p.log.Error("metrics", "err", fmt.Sprint(v...)) }

var (
	flowsDesc  = prometheus.NewDesc("rerouted_flows", "Translated flows, by uplink and protocol.", []string{"uplink", "proto"}, nil)
	passesDesc = prometheus.NewDesc("rerouted_passes", "UDP and echo tuples decided untranslated, cached in the kernel.", []string{"proto"}, nil)
)

// flowCollector counts the flow table at scrape time.
type flowCollector struct{ d *Daemon }

func (c *flowCollector) Describe(ch chan<- *prometheus.Desc) { ch <- flowsDesc; ch <- passesDesc }

func (c *flowCollector) Collect(ch chan<- prometheus.Metric) {
	names := map[uint32]string{}
	for _, u := range c.d.Config.Load().Uplinks {
		names[u.Mark] = u.Name
	}
	type key struct{ uplink, proto string }
	flows, passes := map[key]int{}, map[string]int{}
	for _, f := range c.d.Flows().Snapshot() {
		if f.Pass {
			passes[f.Proto.String()]++
			continue
		}
		flows[key{UplinkName(names, f), f.Proto.String()}]++
	}
	for k, n := range flows {
		ch <- prometheus.MustNewConstMetric(flowsDesc, prometheus.GaugeValue, float64(n), k.uplink, k.proto)
	}
	for p, n := range passes {
		ch <- prometheus.MustNewConstMetric(passesDesc, prometheus.GaugeValue, float64(n), p)
	}
}

// UplinkName is f's uplink label: the name of the uplink whose mark it
// carries (names, by mark), "default", or "mark-N".
func UplinkName(names map[uint32]string, f *flow.Flow) string {
	if n, ok := names[f.Mark]; ok {
		return n
	}
	if f.Mark == 0 {
		return "default"
	}
	return "mark-" + strconv.FormatUint(uint64(f.Mark), 10)
}

var (
	queuePacketsDesc = prometheus.NewDesc("rerouted_queue_packets_total", "Packets the kernel queued to the daemon.", []string{"queue"}, nil)
	// reason: queue_full (the queue was), socket_full (the socket's buffer was).
	queueDropsDesc = prometheus.NewDesc("rerouted_queue_drops_total",
		"Packets the kernel could not queue, by queue and reason.", []string{"queue", "reason"}, nil)
)

// queueCollector reads the kernel's per-queue counters
// (/proc/net/netfilter/nfnetlink_queue) for the daemon's queues.
type queueCollector struct{ d *Daemon }

func (c *queueCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- queuePacketsDesc
	ch <- queueDropsDesc
}

func (c *queueCollector) Collect(ch chan<- prometheus.Metric) {
	f, err := os.Open("/proc/net/netfilter/nfnetlink_queue")
	if err != nil {
		return
	}
	defer f.Close()
	dc := c.d.Config.Load().Daemon
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// queue peer_portid queue_total copy_mode copy_range queue_dropped user_dropped id_sequence 1
		fs := strings.Fields(sc.Text())
		if len(fs) < 8 {
			continue
		}
		n, err := strconv.Atoi(fs[0])
		if err != nil || n < int(dc.Queue) || n >= int(dc.Queue)+dc.Queues {
			continue
		}
		val := func(i int) float64 { v, _ := strconv.ParseFloat(fs[i], 64); return v }
		ch <- prometheus.MustNewConstMetric(queuePacketsDesc, prometheus.CounterValue, val(7), fs[0])
		ch <- prometheus.MustNewConstMetric(queueDropsDesc, prometheus.CounterValue, val(5), fs[0], "queue_full")
		ch <- prometheus.MustNewConstMetric(queueDropsDesc, prometheus.CounterValue, val(6), fs[0], "socket_full")
	}
}

var (
	uplinkUpDesc  = prometheus.NewDesc("rerouted_uplink_up", "1 if the uplink is up for the family (link, address, route, probes), else 0.", []string{"uplink", "family"}, nil)
	probeRTTDesc  = prometheus.NewDesc("rerouted_uplink_probe_rtt_seconds", "The best round-trip time of the uplink's last probe round.", []string{"uplink", "family"}, nil)
	probeLossDesc = prometheus.NewDesc("rerouted_uplink_probe_loss_ratio", "The share of the last 10 probe rounds in which every target failed.", []string{"uplink", "family"}, nil)
)

// uplinkCollector reports the uplinks' states at scrape time.
type uplinkCollector struct{ d *Daemon }

func (c *uplinkCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- uplinkUpDesc
	ch <- probeRTTDesc
	ch <- probeLossDesc
	ch <- quotaRemainingDesc
}

var quotaRemainingDesc = prometheus.NewDesc("rerouted_uplink_quota_remaining_bytes",
	"What is left of each uplink's quota this period, in bytes (0: over it).", []string{"uplink"}, nil)

func (c *uplinkCollector) Collect(ch chan<- prometheus.Metric) {
	quota := map[string]bool{}
	for _, st := range c.d.Uplinks.List() {
		if st.Quota > 0 && !quota[st.Uplink] { // one quota for both families
			quota[st.Uplink] = true
			left := 0.0
			if st.QuotaUsed < st.Quota {
				left = float64(st.Quota - st.QuotaUsed)
			}
			ch <- prometheus.MustNewConstMetric(quotaRemainingDesc, prometheus.GaugeValue, left, st.Uplink)
		}
		v := 0.0
		if st.Up {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(uplinkUpDesc, prometheus.GaugeValue, v, st.Uplink, st.Family)
		if st.Probed {
			ch <- prometheus.MustNewConstMetric(probeRTTDesc, prometheus.GaugeValue, st.RTT.Seconds(), st.Uplink, st.Family)
			ch <- prometheus.MustNewConstMetric(probeLossDesc, prometheus.GaugeValue, st.Loss, st.Uplink, st.Family)
		}
	}
}

// Past its budget (new_flows_per_uid): sent to the overflow queue.
var overBudgetDesc = prometheus.NewDesc("rerouted_uid_over_budget_total",
	"New flows of a user past its budget, by uid.", []string{"uid"}, nil)

// budgetCollector reads the kernel's per-uid counts at scrape time.
type budgetCollector struct{ d *Daemon }

func (c *budgetCollector) Describe(ch chan<- *prometheus.Desc) { ch <- overBudgetDesc }

func (c *budgetCollector) Collect(ch chan<- prometheus.Metric) {
	over, err := c.d.Datapath().OverBudget()
	if err != nil {
		c.d.Log.Error("metrics: read the per-user budget's counts", "err", err)
		return
	}
	for uid, n := range over {
		ch <- prometheus.MustNewConstMetric(overBudgetDesc, prometheus.CounterValue, float64(n), strconv.FormatUint(uint64(uid), 10))
	}
}

// steeringCollector reports the program's counts, when it runs.
type steeringCollector struct{ d *Daemon }

func (c steeringCollector) Describe(ch chan<- *prometheus.Desc) { ch <- steer.Desc }

func (c steeringCollector) Collect(ch chan<- prometheus.Metric) {
	if s := c.d.Steer.Load(); s != nil {
		s.Collect(ch)
	}
}
