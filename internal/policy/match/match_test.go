package match

import (
	"net/netip"
	"os/user"
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
)

// A uid or gid is named by its user or group where the host knows it, and
// by its number alone where it does not.
func TestWhyNamesUsers(t *testing.T) {
	saveU, saveG := lookupUserID, lookupGroupID
	defer func() { lookupUserID, lookupGroupID = saveU, saveG }()
	lookupUserID = func(id string) (*user.User, error) {
		if id == "1000" {
			return &user.User{Uid: id, Username: "alice"}, nil
		}
		return nil, user.UnknownUserIdError(4321)
	}
	lookupGroupID = func(id string) (*user.Group, error) {
		if id == "100" {
			return &user.Group{Gid: id, Name: "users"}, nil
		}
		return nil, user.UnknownGroupIdError(id)
	}
	uid, gid := UID("uid", []uint32{0}), GID("gid", []uint32{50})
	for _, c := range []struct {
		uid, gid uint32
		want     [2]string
	}{
		{1000, 100, [2]string{"uid: uid 1000 (alice) is not in [0]", "gid: gid 100 (users) is not in [50]"}},
		{4321, 4321, [2]string{"uid: uid 4321 is not in [0]", "gid: gid 4321 is not in [50]"}},
	} {
		f := &Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort("192.0.2.80:80"), UID: c.uid, GID: c.gid, HasUID: true}
		for i, cd := range []*Cond{&uid, &gid} {
			if cd.Holds(f) {
				t.Errorf("%s holds for uid %d gid %d", cd.Key, c.uid, c.gid)
			}
			if got := cd.Why(f); got != c.want[i] {
				t.Errorf("uid %d gid %d: Why = %q, want %q", c.uid, c.gid, got, c.want[i])
			}
		}
	}
	if got := IDName("uid", 1000); got != "uid 1000 (alice)" {
		t.Errorf("IDName = %q", got)
	}
	// A flow with no owning socket has no uid: the condition fails,
	// negated or not.
	not := UID("not_uid", []uint32{0})
	not.Neg = true
	f := &Flow{Proto: ipproto.UDP, Dst: netip.MustParseAddrPort("192.0.2.80:53")}
	if uid.Holds(f) || not.Holds(f) || uid.Why(f) != "uid: the connection has no owning socket" {
		t.Errorf("no socket: holds %v / %v, Why %q", uid.Holds(f), not.Holds(f), uid.Why(f))
	}
}
