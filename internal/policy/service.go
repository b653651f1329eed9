package policy

import "strings"

// A UDP service on the host answers its clients from an unconnected socket
// bound to its own port. Its answers must leave from the address the client
// asked, whatever a rule about destinations says: the kernel learns the
// tuples clients open and lets the answers pass, but what it can learn is
// bounded, and a flood of new tuples from the internet fills it. The
// daemon then sees such answers as new flows, and decides them with
// DecideService: only rules that name who owns the socket apply, never a
// rule that names only destinations, ports or protocols.

// NamesOwner reports whether the rule has a key about the socket's owner:
// user, uid, group, gid, process, exe or cgroup, or a negated one.
func (r *Rule) NamesOwner() bool {
	for _, c := range r.conds {
		switch strings.TrimPrefix(c.Key, "not_") {
		case "user", "uid", "group", "gid", "process", "exe", "cgroup":
			return true
		}
	}
	return false
}

// DecideService is Decide for a datagram from a local service's socket (an
// unconnected socket bound outside the ephemeral port range): the first
// matching rule that names the socket's owner, or nil.
func (c *Config) DecideService(f *Flow) *Rule {
	for _, r := range c.Rules {
		if r.NamesOwner() && r.Match(f) {
			return r
		}
	}
	return nil
}
