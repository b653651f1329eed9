package lifetime

import (
	"errors"
	"sync/atomic"

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
