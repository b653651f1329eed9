package sockdiag

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"github.com/rerouted/rerouted/internal/nlmsg"
	"golang.org/x/sys/unix"
)

// diagMsg is a struct inet_diag_msg as the kernel lays it out for s,
// followed by an INET_DIAG_CGROUP_ID attribute when s has a cgroup.
func diagMsg(s *Socket) []byte {
	ne := binary.NativeEndian
	m := make([]byte, msgLen)
	m[0] = unix.AF_INET6
	if s.Local.Addr().Is4() {
		m[0] = unix.AF_INET
		copy(m[8:], s.Local.Addr().AsSlice())
		copy(m[24:], s.Remote.Addr().AsSlice())
	} else {
		a, r := s.Local.Addr().As16(), s.Remote.Addr().As16()
		copy(m[8:], a[:])
		copy(m[24:], r[:])
	}
	m[1] = s.State
	binary.BigEndian.PutUint16(m[4:], s.Local.Port())
	binary.BigEndian.PutUint16(m[6:], s.Remote.Port())
	ne.PutUint32(m[40:], 0) // interface
	ne.PutUint32(m[44:], uint32(s.Cookie))
	ne.PutUint32(m[48:], uint32(s.Cookie>>32))
	ne.PutUint32(m[64:], s.UID)
	ne.PutUint32(m[68:], s.Inode)
	if s.CgroupID != 0 {
		m = nlmsg.AppendAttr(m, inetDiagCgroupID, ne.AppendUint64(nil, s.CgroupID))
	}
	return m
}

// FuzzParseMsg: no inet_diag_msg the kernel (or anything else) sends
// makes parseMsg read outside it or panic; one shorter than the struct is
// an error and leaves nothing half-read that could be mistaken for a
// socket; what it reads from a longer one encodes into a message that
// parses back to the same socket.
func FuzzParseMsg(f *testing.F) {
	v4 := Socket{Local: netip.MustParseAddrPort("198.51.100.2:39828"), Remote: netip.MustParseAddrPort("192.0.2.80:80"),
		State: StateEstablished, UID: 1000, Inode: 4242, Cookie: 0x1122334455667788, CgroupID: 0x99}
	v6 := Socket{Local: netip.MustParseAddrPort("[2001:db8:b::2]:5353"), Remote: netip.MustParseAddrPort("[2001:db8::53]:53"),
		State: 7, Cookie: 1}
	tw := Socket{Local: v4.Local, Remote: v4.Remote, State: StateTimeWait}
	for _, s := range []*Socket{&v4, &v6, &tw} {
		f.Add(diagMsg(s))
	}
	m := diagMsg(&v4)
	f.Add(m[:msgLen-1])                                                     // short
	f.Add(append(m[:msgLen:msgLen], 12, 0, inetDiagCgroupID, 0, 1, 2))      // truncated attribute
	f.Add(nlmsg.AppendAttr(m[:msgLen:msgLen], inetDiagCgroupID, []byte{1})) // short cgroup id
	f.Add(append(bytes.Clone(m), m...))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, m []byte) {
		orig := bytes.Clone(m)
		var s Socket
		err := parseMsg(m, &s)
		if !bytes.Equal(m, orig) {
			t.Fatal("parseMsg changed its input")
		}
		if len(m) < msgLen {
			if err == nil || s != (Socket{}) {
				t.Fatalf("a %d-byte message: %v, read as %+v; want an error and nothing read", len(m), err, s)
			}
			return
		}
		if err != nil {
			t.Fatalf("refused a %d-byte message: %v", len(m), err)
		}
		if s.Local.Port() != binary.BigEndian.Uint16(m[4:]) || s.Remote.Port() != binary.BigEndian.Uint16(m[6:]) {
			t.Fatalf("ports %d, %d from % x", s.Local.Port(), s.Remote.Port(), m[4:8])
		}
		if s.Local.Addr().Is4() != (m[0] == unix.AF_INET) || s.Remote.Addr().Is4() != (m[0] == unix.AF_INET) {
			t.Fatalf("family %d read as %v, %v", m[0], s.Local, s.Remote)
		}
		var again Socket
		if err := parseMsg(diagMsg(&s), &again); err != nil || again != s {
			t.Fatalf("parsed %+v, re-encoded reads back as %+v (%v)", s, again, err)
		}
	})
}
