package usage

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"
)

var (
	uplinkBytes = prometheus.NewDesc("rerouted_uplink_bytes_total",
		"Bytes each uplink carried for the host's sockets, as the wire carries them (IP headers included), by direction.", []string{"uplink", "direction"}, nil)
	uplinkPackets = prometheus.NewDesc("rerouted_uplink_packets_total",
		"Packets each uplink carried for the host's sockets, by direction.", []string{"uplink", "direction"}, nil)
	notCounted = prometheus.NewDesc("rerouted_usage_sockets_not_counted_total",
		"Sockets usage accounting could not enter (its socket map was full): their traffic is counted nowhere.", nil, nil)
	ownerBytes = prometheus.NewDesc("rerouted_owner_bytes_total",
		"Bytes each owner's sockets sent and received on each uplink, by kind of owner (user, cgroup, exe, rule); past the top owners, \"other\".", []string{"uplink", "direction", "owner_kind", "owner"}, nil)
)

// Collector is the usage metrics, read from the last harvest. Each
// uplink's owners of each kind are named as they appear, up to top; later
// ones are "other". A name, once given, stays for the daemon's life, so
// that every series only grows.
type Collector struct {
	report func() (Report, bool) // false: accounting is off
	top    int
	mu     sync.Mutex
	named  map[[2]string]map[string]bool // (uplink, kind) → the names given
}

// NewCollector is the collector of what report returns.
func NewCollector(report func() (Report, bool), top int) *Collector {
	return &Collector{report: report, top: top, named: map[[2]string]map[string]bool{}}
}

// Describe is prometheus.Collector's.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- uplinkBytes
	ch <- uplinkPackets
	ch <- ownerBytes
	ch <- notCounted
}

// Collect is prometheus.Collector's.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	r, ok := c.report()
	if !ok {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	ch <- prometheus.MustNewConstMetric(notCounted, prometheus.CounterValue, float64(r.SocketsNotCounted))
	totals := map[string]*Counts{}
	for _, u := range r.Uplinks {
		totals[u] = &Counts{}
	}
	type okey struct{ uplink, kind, name string }
	owners := map[okey]*Counts{}
	for _, row := range r.Rows {
		t := totals[row.Uplink]
		if t == nil {
			t = &Counts{}
			totals[row.Uplink] = t
		}
		t.Add(row.Counts)
		for _, kind := range Kinds {
			name := c.name(row.Uplink, kind, row.Owner.Of(kind))
			k := okey{row.Uplink, kind, name}
			if owners[k] == nil {
				owners[k] = &Counts{}
			}
			owners[k].Add(row.Counts)
		}
	}
	for u, t := range totals {
		ch <- prometheus.MustNewConstMetric(uplinkBytes, prometheus.CounterValue, float64(t.BytesIn), u, "in")
		ch <- prometheus.MustNewConstMetric(uplinkBytes, prometheus.CounterValue, float64(t.BytesOut), u, "out")
		ch <- prometheus.MustNewConstMetric(uplinkPackets, prometheus.CounterValue, float64(t.PacketsIn), u, "in")
		ch <- prometheus.MustNewConstMetric(uplinkPackets, prometheus.CounterValue, float64(t.PacketsOut), u, "out")
	}
	for k, t := range owners {
		ch <- prometheus.MustNewConstMetric(ownerBytes, prometheus.CounterValue, float64(t.BytesIn), k.uplink, "in", k.kind, k.name)
		ch <- prometheus.MustNewConstMetric(ownerBytes, prometheus.CounterValue, float64(t.BytesOut), k.uplink, "out", k.kind, k.name)
	}
}

// name is the owner label of name: itself while there is room, or once
// given; else "other". An unknown owner is "unknown".
func (c *Collector) name(uplink, kind, name string) string {
	if name == "" {
		name = "unknown"
	}
	if name == "other" {
		return name
	}
	k := [2]string{uplink, kind}
	set := c.named[k]
	if set == nil {
		set = map[string]bool{}
		c.named[k] = set
	}
	if set[name] {
		return name
	}
	if len(set) < c.top {
		set[name] = true
		return name
	}
	return "other"
}
