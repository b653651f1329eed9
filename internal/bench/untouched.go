package bench

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
)

// The untouched-traffic measurement: what rerouted costs traffic no rule
// concerns. The same connections and fresh-socket UDP exchanges (what a
// DNS stub makes) run without rerouted, then with it running and a rule
// for another port only; the kernel's prefilter should let them by.

// portUntouchedUDP answers datagrams, for the UDP exchanges.
const portUntouchedUDP = 5005

// UntouchedResult is the untouched-traffic measurement: rates without
// and with rerouted running (medians over the rounds).
type UntouchedResult struct {
	TCPWithout, TCPWith float64 // connections per second, one at a time
	UDPWithout, UDPWith float64 // exchanges per second, each from a new socket
	// The paired ratios: with over without in the same round (the two
	// measured seconds apart), median and middle half over the rounds.
	TCPRatio, UDPRatio string
}

// untouchedRule concerns another port only.
const untouchedRule = `
[[rule]]
name = "another port"
uplink = "isp-b"
dport = [9999]
`

func (b *run) untouched() (UntouchedResult, error) {
	if _, err := b.w.ServeUDP(portUntouchedUDP); err != nil {
		return UntouchedResult{}, err
	}
	var tw, tr, uw, ur []float64
	var tcpRatio, udpRatio []float64
	for round := 1; round <= b.o.Rounds; round++ {
		// [with][tcp, udp] this round, 0 where it failed
		var got [2][2]float64
		for _, with := range []bool{round%2 == 0, round%2 != 0} { // alternate which goes first
			undo := func() error { return nil }
			if with {
				u, _, err := b.setupRerouted("kernel", untouchedRule, false)(b)
				if err != nil {
					return UntouchedResult{}, err
				}
				undo = u
			}
			tcp, _, err := b.connections(networld.DialOptions{}, 1)
			if err == nil {
				var udp float64
				udp, err = b.exchanges(b.o.Conns)
				if with {
					tw, uw = append(tw, tcp), append(uw, udp)
					got[1] = [2]float64{tcp, udp}
				} else {
					tr, ur = append(tr, tcp), append(ur, udp)
					got[0] = [2]float64{tcp, udp}
				}
				b.logf("untouched, round %d, rerouted running %v: %.0f conn/s, %.0f UDP exchanges/s", round, with, tcp, udp)
			}
			if err := errors.Join(err, undo()); err != nil {
				return UntouchedResult{}, err
			}
		}
		if got[0][0] > 0 && got[1][0] > 0 {
			tcpRatio = append(tcpRatio, got[1][0]/got[0][0])
		}
		if got[0][1] > 0 && got[1][1] > 0 {
			udpRatio = append(udpRatio, got[1][1]/got[0][1])
		}
	}
	return UntouchedResult{TCPWithout: med(tr), TCPWith: med(tw), UDPWithout: med(ur), UDPWith: med(uw),
		TCPRatio: medianRatio(tcpRatio), UDPRatio: medianRatio(udpRatio)}, nil
}

// exchanges makes n UDP request/response exchanges, each from a new
// socket, one at a time, and returns their rate.
func (b *run) exchanges(n int) (float64, error) {
	dst := net.UDPAddrFromAddrPort(netip.AddrPortFrom(networld.ServerAddr, portUntouchedUDP))
	start := time.Now()
	err := b.w.Host.Do(func() error {
		buf := make([]byte, 64)
		for i := 0; i < n; i++ {
			c, err := net.DialUDP("udp4", nil, dst)
			if err != nil {
				return err
			}
			c.SetDeadline(time.Now().Add(2 * time.Second))
			if _, err := c.Write([]byte("q")); err != nil {
				c.Close()
				return err
			}
			_, err = c.Read(buf)
			c.Close()
			if err != nil {
				return fmt.Errorf("exchange %d: %w", i, err)
			}
		}
		return nil
	})
	return float64(n) / time.Since(start).Seconds(), err
}

func med(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// UntouchedTable prints the untouched-traffic measurement.
func UntouchedTable(w io.Writer, u UntouchedResult) {
	ratio := func(with, without float64) string {
		if without == 0 {
			return "-"
		}
		return fmt.Sprintf("%.2f", with/without)
	}
	fmt.Fprintln(w, "\nTraffic no rule concerns (a rule for another port; the kernel's prefilter lets it by):")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| traffic | without rerouted | with rerouted | ratio | paired ratio (middle half) |")
	fmt.Fprintln(w, "|---|---|---|---|---|")
	fmt.Fprintf(w, "| TCP connections, one at a time | %.0f/s | %.0f/s | %s | %s |\n", u.TCPWithout, u.TCPWith, ratio(u.TCPWith, u.TCPWithout), u.TCPRatio)
	fmt.Fprintf(w, "| UDP exchanges, each from a new socket | %.0f/s | %.0f/s | %s | %s |\n", u.UDPWithout, u.UDPWith, ratio(u.UDPWith, u.UDPWithout), u.UDPRatio)
}
