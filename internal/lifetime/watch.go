package lifetime

import (
	"errors"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/rerouted/rerouted/internal/flow"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/packet"
	"github.com/rerouted/rerouted/internal/sockdiag"
)

// WatchUDP ends the flows of each UDP socket the kernel destroys, so that
// a new socket on the same tuple is decided afresh rather than inheriting
// the old decision until the sweeps notice. It returns what stops it.
func WatchUDP(env Env) (stop func() error, err error) {
	w, err := sockdiag.WatchUDPDestroyed()
	if err != nil {
		return nil, err
	}
	s := env.Shared
	ended := func(so *sockdiag.Socket) {
		s.Closed.Add(so.Cookie)
		for _, f := range env.flows().ByCookie(so.Cookie) {
			env.UDPClosed.Add(1)
			s.Log.Debug("socket closed", "proto", "udp", "src", f.Src, "dst", f.Dst, "cookie", f.Cookie)
			s.Forget(f)
		}
	}
	var closing atomic.Bool
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			err := w.Receive(ended)
			if err != nil && (closing.Load() || env.closesFailed("UDP", env.UDPEvents, err)) {
				return
			}
		}
	}()
	return func() error { closing.Store(true); err := w.Close(); <-watched; return err }, nil
}

// closesFailed counts (in errs) and logs an error reading the
// announcements of proto sockets' ends, and reports whether reading them
// has stopped (all but a lost batch stop it).
func (e *Env) closesFailed(proto string, errs *atomic.Uint64, err error) bool {
	errs.Add(1)
	if errors.Is(err, sockdiag.ErrLost) {
		e.Shared.Log.Warn(proto+" socket ends were lost (too many at once); the sweep ends their flows", "err", err)
		return false
	}
	e.Shared.Log.Error(proto+" socket ends: no longer received; the sweep ends their flows", "err", err)
	return true
}

// WatchTCP ends the flow of each TCP socket the kernel destroys, unless a
// TIME_WAIT socket took its tuple over (the sweep ends those), so that a
// new socket on its tuple (its port comes round again) is decided by the
// kernel, not sent to the daemon as a tuple that has elements already. It
// has its own sock_diag socket for the lookups, and returns what stops
// it.
//
// It reads the announcements in batches, tcpClosesEvery after the first
// of each: a flow's elements need not go the instant its socket does (a
// new socket on the tuple is told apart by its cookie at its SYN), the
// kernel wakes no reader per announcement, and an idle host none at all. A flow the kernel decided whose socket was gone before the
// daemon learned it has no cookie: it is found by its tuple, and the
// learner finds the recent ends in ClosedTCP when the announcement came
// first.
func WatchTCP(env Env) (stop func() error, err error) {
	closes, err := sockdiag.PollTCPDestroyed()
	if err != nil {
		return nil, err
	}
	diag, err := sockdiag.Open()
	if err != nil {
		closes.Close()
		return nil, err
	}
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		ended := func(s *sockdiag.Socket) { env.tcpEnded(s, diag) }
		for {
			queued, err := closes.Wait()
			if err == nil && !queued {
				return // stopped
			}
			if err == nil {
				time.Sleep(tcpClosesEvery) // the rest of the batch
				err = closes.Drain(ended)
				if errors.Is(err, sockdiag.ErrLost) {
					// The queue overflowed, and while it stays full
					// the kernel drops the next ones without a word:
					// read it at once.
					env.closesFailed("TCP", env.TCPEvents, err)
					err = closes.Drain(ended)
				}
			}
			if err != nil && env.closesFailed("TCP", env.TCPEvents, err) {
				return
			}
		}
	}()
	return func() error {
		err := closes.Stop() // every Wait returns at once from then on
		<-watched
		return errors.Join(err, closes.Close(), diag.Close())
	}, nil
}

// tcpClosesEvery is how long a batch of announcements of TCP sockets'
// ends gathers after its first.
const tcpClosesEvery = 10 * time.Millisecond

// tcpEnded ends the flow of the TCP socket so, whose end the kernel
// announced, if no socket owns its tuple now. A socket that ended with a
// reset (SO_LINGER 0) is announced without its source address and
// destination port (tcp_disconnect clears them): only its cookie names it,
// which the table does not index for TCP, so the sweep ends its flow.
func (e *Env) tcpEnded(so *sockdiag.Socket, diag sockdiag.Sockets) {
	s := e.Shared
	s.Closed.Add(so.Cookie)
	s.ClosedTCP.Add(packet.ClosedKey(so.Local.Port(), so.Remote.Addr()))
	if so.Remote.Port() == 0 {
		return
	}
	f := e.flows().Get(flow.Key{Proto: ipproto.TCP, Src: unmap(so.Local), Dst: unmap(so.Remote)})
	if f == nil || (f.Cookie != so.Cookie && f.Cookie != 0) {
		return // no flow, or a new socket's on the tuple
	}
	found, err := diag.Lookup(ipproto.TCP, f.Src, f.Dst)
	switch {
	case err == nil:
		return // TIME_WAIT, or a new socket: the sweep decides
	case !errors.Is(err, sockdiag.ErrNotFound):
		s.Stats.Errors[packet.ErrSocketLookup].Add(1)
		s.Log.Error("socket lookup after its end was announced", "src", f.Src, "dst", f.Dst, "err", err)
		return
	}
	s.Stats.TCPClosed.Add(1)
	s.Log.Debug("socket closed", "proto", "tcp", "src", f.Src, "dst", f.Dst, "cookie", f.Cookie, "found_cookie", found.Cookie)
	s.ForgetSoon(f)
}

func unmap(a netip.AddrPort) netip.AddrPort { return netip.AddrPortFrom(a.Addr().Unmap(), a.Port()) }
