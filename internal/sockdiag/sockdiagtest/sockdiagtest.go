// Package sockdiagtest is the one fake of sock_diag (sockdiag.Sockets)
// every test shares: the host's sockets, by exact tuple, with the failures
// the tests ask for.
package sockdiagtest

import (
	"net/netip"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/sockdiag"
	"golang.org/x/sys/unix"
)

// Tuple is a socket's protocol, local and remote address.
type Tuple struct {
	Proto         ipproto.Proto
	Local, Remote netip.AddrPort
}

// Sockets is the host's sockets. Its zero value has none; Add adds one.
// Like a sockdiag.Conn, it is used by one goroutine at a time.
type Sockets struct {
	Socks map[Tuple]sockdiag.Socket

	// Missed sockets are left out of dumps (a dump is not atomic) but
	// found by an exact lookup.
	Missed  map[Tuple]bool
	DumpErr error // every dump fails with it

	LookupErr error          // every lookup fails with it
	FailFirst int            // or only this many lookups (with ENOBUFS)
	FailAt    map[Tuple]bool // or lookups of these tuples (ENOBUFS)

	Destroyed []Tuple // each Destroy's tuple, in order
}

var _ sockdiag.Sockets = (*Sockets)(nil)

// Add makes a socket exist on its tuple.
func (s *Sockets) Add(proto ipproto.Proto, so sockdiag.Socket) {
	if s.Socks == nil {
		s.Socks = map[Tuple]sockdiag.Socket{}
	}
	s.Socks[Tuple{proto, so.Local, so.Remote}] = so
}

// Lookup implements sockdiag.Sockets. It allocates nothing.
func (s *Sockets) Lookup(proto ipproto.Proto, local, remote netip.AddrPort) (sockdiag.Socket, error) {
	t := Tuple{proto, local, remote}
	switch {
	case s.LookupErr != nil:
		return sockdiag.Socket{}, s.LookupErr
	case s.FailFirst > 0:
		s.FailFirst--
		return sockdiag.Socket{}, unix.ENOBUFS
	case s.FailAt[t]:
		return sockdiag.Socket{}, unix.ENOBUFS
	}
	so, ok := s.Socks[t]
	if !ok {
		return sockdiag.Socket{}, sockdiag.ErrNotFound
	}
	return so, nil
}

// Dump implements sockdiag.Sockets: the sockets of proto in family, but
// the missed ones.
func (s *Sockets) Dump(family uint8, proto ipproto.Proto, fn func(*sockdiag.Socket)) error {
	if s.DumpErr != nil {
		return s.DumpErr
	}
	for t, so := range s.Socks {
		if t.Proto == proto && t.Local.Addr().Is6() == (family == unix.AF_INET6) && !s.Missed[t] {
			fn(&so)
		}
	}
	return nil
}

// Destroy implements sockdiag.Sockets: it records the tuple (the socket
// stays in Socks).
func (s *Sockets) Destroy(proto ipproto.Proto, local, remote netip.AddrPort, cookie uint64) error {
	t := Tuple{proto, local, remote}
	s.Destroyed = append(s.Destroyed, t)
	return nil
}

// Close implements sockdiag.Sockets.
func (s *Sockets) Close() error { return nil }
