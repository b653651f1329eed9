package packet

import (
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/sockdiag"
)

// sockOwner is the policy's view of who owns the socket being decided. It
// looks the process and the cgroup up at most once per decision, and only if
// a rule asks. The packet goroutine reuses one instance.
type sockOwner struct {
	owners Owners
	sock   sockdiag.Socket // a copy: a pointer would make every lookup's Socket escape

	procDone, cgDone bool
	proc             owner.Process
	hasProc          bool
	cg               string
	hasCg            bool
}

func (o *sockOwner) reset(sock *sockdiag.Socket) {
	*o = sockOwner{owners: o.owners, sock: *sock}
}

func (o *sockOwner) Process() (owner.Process, bool) {
	if !o.procDone {
		o.procDone = true
		if o.sock.Inode == 0 { // no socket known (an echo): no owner to find
			return o.proc, false
		}
		o.proc, o.hasProc = o.owners.Process(o.sock.Inode, o.sock.UID, o.sock.CgroupID)
	}
	return o.proc, o.hasProc
}

func (o *sockOwner) Cgroup() (string, bool) {
	if !o.cgDone {
		o.cgDone = true
		if o.sock.CgroupID == 0 {
			return o.cg, false
		}
		o.cg, o.hasCg = o.owners.Cgroup(o.sock.CgroupID)
	}
	return o.cg, o.hasCg
}
