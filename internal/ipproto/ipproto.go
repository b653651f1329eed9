// Package ipproto is the IP protocol number as rerouted's packages pass it
// between them: the packet parser, the flow table, the kernel's table,
// sock_diag and the policy. It is a byte on the wire and in netlink
// messages, and costs nothing more here.
package ipproto

import "strconv"

// Proto is an IP protocol number (the IPv4 protocol field, the IPv6 next
// header).
type Proto uint8

// The protocols rerouted translates.
const (
	ICMP   Proto = 1
	TCP    Proto = 6
	UDP    Proto = 17
	ICMPv6 Proto = 58
)

// String names p as conntrack does ("tcp", "udp", "icmp", "icmpv6"), or by
// its number: the name in log lines, the debug stream, metric labels and
// the control socket's flow list.
func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case ICMP:
		return "icmp"
	case ICMPv6:
		return "icmpv6"
	}
	return strconv.Itoa(int(p))
}

// IsICMP reports whether p is ICMP or ICMPv6: an echo, for rerouted, whose
// identifier stands for both ports.
func (p Proto) IsICMP() bool { return p == ICMP || p == ICMPv6 }
