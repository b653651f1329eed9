package uplink

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"time"

	"github.com/rerouted/rerouted/internal/nftdp"
	"github.com/rerouted/rerouted/internal/policy"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"
)

// Probes leave through the uplink they check: their sockets carry its mark
// (so its routing table takes them) and its address (so its ISP lets them
// through and answers to it). They carry nftdp.ProbePriority too, which the
// table lets through before anything else: a probe never reaches the
// daemon's queue and is never translated.

// lossWindow is how many rounds the loss figure covers.
const lossWindow = 10

// RunProbes probes u's [uplink.health] targets every interval until ctx is
// done, and reports its verdicts to s; report gets the transitions they
// make. A family is down after down_after rounds in which every target of
// that family failed, and up again after up_after good rounds.
func RunProbes(ctx context.Context, u *policy.Uplink, s *States, report func([]Transition)) {
	h := u.Health
	var fams [2][]policy.Target
	for _, t := range h.Targets {
		fi := 0
		if t.Addr.Addr().Is6() {
			fi = 1
		}
		fams[fi] = append(fams[fi], t)
	}
	var st [2]hysteresis
	st[0].up, st[1].up = true, true // until proven otherwise: no flap at start
	id := uint16(rand.Uint32())
	seq := uint16(0)
	tick := time.NewTicker(h.Interval)
	defer tick.Stop()
	for {
		for fi, targets := range fams {
			if len(targets) == 0 {
				continue
			}
			f := &st[fi]
			cur, _ := s.Get(u.Mark, fi == 1)
			var src netip.Addr
			if len(cur.Addrs) > 0 {
				src = cur.Addrs[0]
			}
			seq++
			rtt, failure := round(ctx, u, targets, src, h.Timeout, id, seq)
			if ctx.Err() != nil {
				return
			}
			up, why, loss := f.observe(failure, h.DownAfter, h.UpAfter)
			if ts := s.SetProbe(u.Mark, fi == 1, up, why, rtt, loss, time.Now()); len(ts) > 0 {
				report(ts)
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// hysteresis is one family's verdict from its probe rounds.
type hysteresis struct {
	up          bool
	fails, oks  int // consecutive failed, good rounds
	lost        [lossWindow]bool
	round       int
	lastFailure string
}

// observe takes one round's outcome (failure: what failed, "" for a good
// round) and returns the family's verdict: down after downAfter failed
// rounds in a row, up again after upAfter good ones; why it is down; and
// the share of the last lossWindow rounds that failed.
func (f *hysteresis) observe(failure string, downAfter, upAfter int) (up bool, why string, loss float64) {
	failed := failure != ""
	f.lost[f.round%lossWindow] = failed
	f.round++
	lost := 0
	for _, l := range f.lost[:min(f.round, lossWindow)] {
		if l {
			lost++
		}
	}
	if failed {
		f.fails, f.oks, f.lastFailure = f.fails+1, 0, failure
	} else {
		f.fails, f.oks = 0, f.oks+1
	}
	switch {
	case f.up && f.fails >= downAfter:
		f.up = false
	case !f.up && f.oks >= upAfter:
		f.up = true
	}
	if !f.up {
		why = fmt.Sprintf("%d rounds without an answer (%s)", f.fails, f.lastFailure)
		if f.oks > 0 {
			why = fmt.Sprintf("%d good rounds of %d needed (last failure: %s)", f.oks, upAfter, f.lastFailure)
		}
	}
	return f.up, why, float64(lost) / float64(min(f.round, lossWindow))
}

// round probes every target at once; it succeeds if any answers. It
// returns the best round-trip time, or what failed.
func round(ctx context.Context, u *policy.Uplink, targets []policy.Target, src netip.Addr, timeout time.Duration, id, seq uint16) (time.Duration, string) {
	if !src.IsValid() {
		return 0, "no address to send from"
	}
	type result struct {
		t   policy.Target
		rtt time.Duration
		err error
	}
	results := make(chan result, len(targets))
	for _, t := range targets {
		go func() {
			start := time.Now()
			var err error
			if t.TCP {
				err = probeTCP(ctx, u.Mark, src, t.Addr, timeout)
			} else {
				err = probeICMP(u.Mark, src, t.Addr.Addr(), timeout, id, seq)
			}
			results <- result{t, time.Since(start), err}
		}()
	}
	var best time.Duration
	var failed []string
	for range targets {
		r := <-results
		if r.err == nil {
			if best == 0 || r.rtt < best {
				best = r.rtt
			}
			continue
		}
		failed = append(failed, fmt.Sprintf("%s: %v", r.t, r.err))
	}
	if best > 0 {
		return best, ""
	}
	return 0, strings.Join(failed, "; ")
}

// probeControl gives a probe's socket the uplink's mark and the probe
// priority, before it sends anything.
func probeControl(mark uint32) func(network, address string, c syscall.RawConn) error {
	return func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark)); serr != nil {
				return
			}
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PRIORITY, nftdp.ProbePriority)
		})
		return errors.Join(err, serr)
	}
}

// probeTCP connects to dst and closes. A refusal is an answer too: the
// path works.
func probeTCP(ctx context.Context, mark uint32, src netip.Addr, dst netip.AddrPort, timeout time.Duration) error {
	d := net.Dialer{Timeout: timeout, LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Control: probeControl(mark)}
	c, err := d.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		if errors.Is(err, unix.ECONNREFUSED) {
			return nil
		}
		if isTimeout(err) {
			return errors.New("no answer")
		}
		var se *net.OpError
		if errors.As(err, &se) {
			return se.Err // without "dial tcp ...: "
		}
		return err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0) // no TIME_WAIT per probe
	}
	return c.Close()
}

// probeICMP sends one echo request to dst and waits for its reply.
func probeICMP(mark uint32, src, dst netip.Addr, timeout time.Duration, id, seq uint16) error {
	network, proto := "ip4:icmp", 1
	var typ, reply icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	if dst.Is6() {
		network, proto = "ip6:ipv6-icmp", 58
		typ, reply = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	}
	lc := net.ListenConfig{Control: probeControl(mark)}
	pc, err := lc.ListenPacket(context.Background(), network, src.String())
	if err != nil {
		return err
	}
	defer pc.Close()
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: int(id), Seq: int(seq), Data: []byte("rerouted probe")}}
	b, err := msg.Marshal(nil) // ICMPv6's checksum is the kernel's
	if err != nil {
		return err
	}
	pc.SetDeadline(time.Now().Add(timeout))
	if _, err := pc.WriteTo(b, &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		return err
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			if isTimeout(err) {
				return errors.New("no answer")
			}
			return err
		}
		if a, ok := from.(*net.IPAddr); !ok || !a.IP.Equal(dst.AsSlice()) {
			continue
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil || m.Type != reply {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && e.ID == int(id) && e.Seq == int(seq) {
			return nil
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
