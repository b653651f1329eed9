package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"
)

// Health is an uplink's [uplink.health]: probes that leave through it and
// say whether the internet answers there. An uplink whose link, address
// and route are fine can still be dark upstream.
type Health struct {
	Targets   []Target
	Interval  time.Duration // between rounds
	Timeout   time.Duration // for one probe
	DownAfter int           // rounds in which every target of a family failed
	UpAfter   int           // good rounds before it is up again
}

// Target is one probe destination: an ICMP echo to Addr, or with TCP a
// connect to Addr:Port.
type Target struct {
	TCP  bool
	Addr netip.AddrPort // Port 0 for ICMP
}

func (t Target) String() string {
	if t.TCP {
		return "tcp:" + t.Addr.String()
	}
	return t.Addr.Addr().String()
}

// Health defaults.
const (
	DefaultProbeInterval = 2 * time.Second
	DefaultProbeTimeout  = time.Second
	DefaultDownAfter     = 3
	DefaultUpAfter       = 2
)

func (p *parser) health(path string, v any) *Health {
	t, ok := v.(map[string]any)
	if !ok {
		p.errorf(path, "health must be a table: [uplink.health]")
		return nil
	}
	h := &Health{Interval: DefaultProbeInterval, Timeout: DefaultProbeTimeout, DownAfter: DefaultDownAfter, UpAfter: DefaultUpAfter}
	duration := func(kp string, v any, what string) (time.Duration, bool) {
		s, _ := v.(string)
		d, err := time.ParseDuration(s)
		if err != nil || d < 100*time.Millisecond || d > time.Hour {
			p.errorf(kp, "%s must be a duration between 100ms and 1h, like \"2s\"", what)
			return 0, false
		}
		return d, true
	}
	for _, k := range sortedKeys(t) {
		kp := path + "." + k
		if !slices.Contains(Keys["uplink.health"], k) {
			p.errorf(kp, "unknown key %q in [uplink.health]", k)
			continue
		}
		switch k {
		case "targets":
			for _, s := range p.strings(kp, t[k]) {
				tg, err := parseTarget(s)
				if err != nil {
					p.errorf(kp, "%v", err)
					continue
				}
				h.Targets = append(h.Targets, tg)
			}
		case "interval":
			if d, ok := duration(kp, t[k], "interval"); ok {
				h.Interval = d
			}
		case "timeout":
			if d, ok := duration(kp, t[k], "timeout"); ok {
				h.Timeout = d
			}
		case "down_after":
			if n, ok := p.integer(kp, t[k], 1, 100); ok {
				h.DownAfter = int(n)
			}
		case "up_after":
			if n, ok := p.integer(kp, t[k], 1, 100); ok {
				h.UpAfter = int(n)
			}
		default:
			p.undecoded(kp, k)
		}
	}
	if len(h.Targets) == 0 {
		p.errorf(path, "[uplink.health] needs targets: addresses to ping, or \"tcp:ADDR:PORT\" to connect to")
	}
	if h.Timeout > h.Interval {
		p.errorf(path+".timeout", "timeout (%s) must not be longer than interval (%s)", h.Timeout, h.Interval)
	}
	return h
}

// parseTarget reads "192.0.2.53", "2001:db8::53" or "tcp:192.0.2.80:443"
// ("tcp:[2001:db8::80]:443").
func parseTarget(s string) (Target, error) {
	if rest, ok := strings.CutPrefix(s, "tcp:"); ok {
		ap, err := netip.ParseAddrPort(rest)
		if err != nil || ap.Port() == 0 || ap.Addr().Zone() != "" {
			return Target{}, fmt.Errorf("target %q: want tcp:ADDRESS:PORT, like \"tcp:192.0.2.80:443\" or \"tcp:[2001:db8::80]:443\"", s)
		}
		return Target{TCP: true, Addr: netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" {
		return Target{}, fmt.Errorf("target %q is not an address to ping (\"192.0.2.53\") or \"tcp:ADDRESS:PORT\"", s)
	}
	return Target{Addr: netip.AddrPortFrom(a.Unmap(), 0)}, nil
}
