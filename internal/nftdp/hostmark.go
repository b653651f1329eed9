package nftdp

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/nftdp/nftbatch"
	"github.com/rerouted/rerouted/internal/nftdp/nftfeat"
	"github.com/rerouted/rerouted/internal/nftdp/prefilter"
	"golang.org/x/sys/unix"
)

// Host marks decided in the kernel. A mark the host's own rules put on a
// new flow's first packet already is the decision; what remains is the
// uplink's source address, the replies' way back and a check that the wire
// tuple is free. For each uplink that is up the table holds a rule per
// family and protocol that does exactly that on the packet path: it checks
// that no translation to the uplink has the port to the destination
// (P_wireF), adds the flow's six elements itself (the maps and the set the
// daemon's translations use), logs a copy of the packet to the daemon's
// NFLOG group (it learns of the flow afterwards, for flows, events,
// sweeping and adoption), and rewrites the packet. A SYN whose socket tuple
// has elements goes to the daemon in a rule of its own (ownedRule), just
// before. Whatever the rules cannot decide (a tuple with elements already,
// a mark of no uplink that is up, a full map) goes on to the queue as
// before: the daemon is the exception path.
//
// A collision with a native socket (one bound to the uplink's address
// itself) is caught both ways: a native SYN onto a translation's wire tuple
// goes to the daemon, which gives it another port; and a reply for a wire
// tuple that a translation claims but a native connected socket owns goes
// to that socket, untouched, and is logged as "taken", so that the daemon
// moves the translation to another port (its SYN is retransmitted).

// HostMark is an uplink whose host-marked flows the kernel decides: Mark
// is its mark, Addr the source its marked route prefers in one family,
// MSS the largest a SYN may announce on its route (0: no clamp).
type HostMark struct {
	Mark uint32
	Addr netip.Addr
	MSS  uint16
}

// LogGroup is the NFLOG group the kernel's decisions are logged to.
const LogGroup = 0x7272

// Prefixes of the log records: a flow the kernel decided (followed by the
// wire's source address), and a reply a native socket owns.
const (
	LogNew   = "rerouted new "
	LogTaken = "rerouted taken"
)

// logSnap is how much of a logged packet the daemon needs: the IPv6 and
// TCP headers, without options.
const logSnap = 80

// SetHostMarks makes the uplinks in hm the ones whose host marks the kernel
// decides. It does nothing on the userspace datapath, or where the kernel
// cannot (HostMarkErr).
func (d *Datapath) SetHostMarks(hm []HostMark) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.userspace || d.HostMarkErr != nil || slices.Equal(hm, d.hostMarks) {
		return nil
	}
	d.hostMarks = slices.Clone(hm)
	return d.applyRules()
}

// probeHostMarks checks, in a scratch table, that the kernel has what the
// kernel-decision rules need (nftfeat.KernelDecisions); one that lacks it
// leaves host marks to the queue (HostMarkErr).
func (d *Datapath) probeHostMarks() {
	if d.userspace {
		d.HostMarkErr = fmt.Errorf("the userspace datapath translates in the daemon")
		return
	}
	lacks, err := nftfeat.ProbeKernelDecisions()
	switch {
	case err != nil:
		d.HostMarkErr = err
	case len(lacks) > 0:
		d.HostMarkErr = &nftfeat.KernelError{Missing: lacks, Err: errors.New("kernel decisions of host marks")}
	}
}

// hostMarkRules are the rules that decide host-marked flows of proto in
// family f, one per uplink address of the family.
func (d *Datapath) hostMarkRules(f *family, p *proto) []nftbatch.Rule {
	var rules []nftbatch.Rule
	for _, h := range d.hostMarks {
		if h.Addr.Is4() != (f.nfproto == unix.NFPROTO_IPV4) {
			continue
		}
		if p.num == ipproto.TCP {
			rules = append(rules, nftbatch.Rule{Chain: "output", Exprs: ownedRule(f, p, h)})
		}
		rules = append(rules, nftbatch.Rule{Chain: "output", Exprs: decideRule(f, p, h)})
	}
	return rules
}

// ownedRule sends a host-marked SYN whose socket tuple has elements to the
// daemon: a retransmission, or a new socket on a tuple not yet swept,
// which the daemon tells apart by the socket's cookie. (A key's absence
// from a map cannot be looked up before Linux 6.12; its presence can,
// into a register: this rule is the absence check of decideRule.)
func ownedRule(f *family, p *proto, h HostMark) [][]byte {
	regs := uint32(f.addrLen / 4)
	m := append(matchProto(f, p, 0), tcpFlags(0x17, 0x02)...)
	m = append(m,
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(h.Mark)},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: f.saddr, Len: uint32(f.addrLen)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: h.Addr.AsSlice()})
	m = append(m, loadTuple(f, f.saddr, p.sport, f.daddr, p.dport)...)
	return nftbatch.Exprs(append(m, &expr.Lookup{SourceRegister: 8, SetName: p.out.Name, DestRegister: 8 + 2*regs + 2, IsDestRegSet: true},
		&expr.Verdict{Kind: expr.VerdictGoto, Chain: prefilter.EnqueueSYN})...)
}

// decideRule is one uplink's kernel decision for proto in family f.
// Registers: a tuple from 8 on; the new address (then the socket's own),
// the mark and the MSS after it (IPv4: 12, 13, 14; IPv6: 18-21, 22, 23).
// Every key the rule builds is made of packet fields and the mark, so that
// nft can print it: the wire tuple is checked as mark . port . destination
// (P_wireF), and the replies' elements are added once the packet carries
// the uplink's address.
func decideRule(f *family, p *proto, h HostMark) [][]byte {
	regs := uint32(f.addrLen / 4)
	addrReg := 8 + 2*regs + 2
	markReg, mssReg := addrReg+regs, addrReg+regs+1
	addr := h.Addr.AsSlice()
	tuple := loadTuple(f, f.saddr, p.sport, f.daddr, p.dport)
	m := matchProto(f, p, 0)
	if p.num == ipproto.TCP {
		m = append(m, tcpFlags(0x17, 0x02)...) // a SYN (a raw socket's too: the learner tells)
	}
	m = append(m,
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(h.Mark)},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: f.saddr, Len: uint32(f.addrLen)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: addr})
	// No translation to this uplink has the port to this destination.
	// (The socket tuple has no elements: a TCP SYN of a tuple with
	// elements went to the daemon just before, see ownedRule; a UDP or
	// echo tuple with elements was translated by the translation rules.)
	m = append(m,
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 8},
		&expr.Payload{DestRegister: 9, Base: expr.PayloadBaseTransportHeader, Offset: p.sport, Len: 2},
		&expr.Payload{DestRegister: 10, Base: expr.PayloadBaseNetworkHeader, Offset: f.daddr, Len: uint32(f.addrLen)},
		&expr.Payload{DestRegister: 10 + regs, Base: expr.PayloadBaseTransportHeader, Offset: p.dport, Len: 2},
		&expr.Lookup{SourceRegister: 8, SetName: p.wire.Name, Invert: true},
		&expr.Dynset{SrcRegKey: 8, SetName: p.wire.Name, Operation: unix.NFT_DYNSET_OP_ADD})
	// Outbound: the socket tuple to the new address, the same port, the
	// mark.
	m = append(m, tuple...)
	m = append(m,
		&expr.Immediate{Register: addrReg, Data: addr},
		&expr.Immediate{Register: markReg, Data: binaryutil.NativeEndian.PutUint32(h.Mark)},
		&expr.Dynset{SrcRegKey: 8, SrcRegData: addrReg, SetName: p.out.Name, Operation: unix.NFT_DYNSET_OP_ADD},
		&expr.Dynset{SrcRegKey: 8, SrcRegData: markReg, SetName: p.outMark.Name, Operation: unix.NFT_DYNSET_OP_ADD})
	if !p.isEcho() {
		m = append(m, &expr.Dynset{SrcRegKey: 8, SrcRegData: 8 + regs, SetName: p.outPort.Name, Operation: unix.NFT_DYNSET_OP_ADD})
	}
	// The daemon's copy, as the socket sent it.
	m = append(m, &expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX | 1<<unix.NFTA_LOG_SNAPLEN,
		Group: LogGroup, Snaplen: logSnap, Data: []byte(LogNew + h.Addr.String())},
		// The socket's address, kept for the replies' element.
		&expr.Payload{DestRegister: addrReg, Base: expr.PayloadBaseNetworkHeader, Offset: f.saddr, Len: uint32(f.addrLen)},
		&expr.Immediate{Register: 8, Data: addr})
	out := nftbatch.Exprs(m...)
	// The packet gets the uplink's address; then its tuple is the wire's,
	// which replies are translated back from.
	out = append(out, nftbatch.AddrWrite(f.addrLen, f.saddr, 8))
	in := append(tuple, &expr.Dynset{SrcRegKey: 8, SrcRegData: addrReg, SetName: p.in.Name, Operation: unix.NFT_DYNSET_OP_ADD})
	if !p.isEcho() {
		in = append(in, &expr.Dynset{SrcRegKey: 8, SrcRegData: 8 + regs, SetName: p.inPort.Name, Operation: unix.NFT_DYNSET_OP_ADD})
	}
	out = append(out, nftbatch.Exprs(in...)...)
	// As the translation rules do: the stale-source guard, the MSS of a
	// SYN, the mark.
	out = append(out, nftbatch.Exprs(
		&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(StaleMark)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
		&expr.Fib{Register: 1, FlagSADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)})...)
	if p.num == ipproto.TCP && h.MSS != 0 {
		out = append(out, nftbatch.Exprs(
			&expr.Immediate{Register: mssReg, Data: binaryutil.BigEndian.PutUint16(h.MSS)},
			&expr.Exthdr{Op: expr.ExthdrOpTcpopt, Type: 2, Offset: 2, Len: 2, SourceRegister: mssReg})...)
	}
	return append(out, nftbatch.Exprs(&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: markReg},
		&expr.Verdict{Kind: expr.VerdictAccept})...)
}

// nativeRules send a SYN whose own tuple is a translation's wire tuple (a
// socket bound to an uplink's address, on a port a translation uses to the
// same peer) to the daemon, which moves it to another port.
func (d *Datapath) nativeRules() []nftbatch.Rule {
	if d.userspace {
		return nil
	}
	var rules []nftbatch.Rule
	for i := range d.fams {
		f := &d.fams[i]
		p := &f.protos[0] // TCP
		rules = append(rules, nftbatch.Rule{Chain: "output", Exprs: nftbatch.Exprs(append(append(append(matchProto(f, p, 0), tcpFlags(0x17, 0x02)...),
			loadTuple(f, f.saddr, p.sport, f.daddr, p.dport)...),
			// (A map's key is looked up into a register: Linux 5.10
			// refuses a lookup in a map without one.)
			&expr.Lookup{SourceRegister: 8, SetName: p.in.Name, DestRegister: 12 + 2*uint32(f.addrLen/4), IsDestRegSet: true},
			&expr.Verdict{Kind: expr.VerdictGoto, Chain: prefilter.EnqueueSYN})...)})
	}
	return rules
}

// takenRules let a reply that a translation claims reach a native socket
// that owns its tuple (connected, or bound to that very address), and log
// it: the daemon moves the translation. Only with kernel decisions, which
// cannot look for such sockets before they choose.
func (d *Datapath) takenRules() []nftbatch.Rule {
	if d.userspace || d.HostMarkErr != nil {
		return nil
	}
	var rules []nftbatch.Rule
	for i := range d.fams {
		f := &d.fams[i]
		regs := uint32(f.addrLen / 4)
		for _, p := range []*proto{&f.protos[0], &f.protos[1]} { // TCP, UDP
			// A reply whose tuple is a local socket's own, while that socket
			// is itself translated to another wire tuple (a native socket
			// the daemon moved), is the translation's: translated now,
			// before the taken rule would give it to that socket.
			for _, v := range checksumVariants(f, p) {
				match := matchProto(f, p, 1)
				if v.cmp != nil {
					match = append(match, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: p.csum, Len: 2}, v.cmp)
				}
				rules = append(rules, nftbatch.Rule{Chain: "prerouting", Exprs: inbound(f, p, match,
					[]expr.Any{&expr.Lookup{SourceRegister: 8, SetName: p.out.Name, DestRegister: 8 + 2*regs + 2, IsDestRegSet: true}}, v.fix)})
			}
			rules = append(rules, nftbatch.Rule{Chain: "prerouting", Exprs: nftbatch.Exprs(append(append(matchProto(f, p, 1),
				loadTuple(f, f.daddr, p.dport, f.saddr, p.sport)...),
				&expr.Lookup{SourceRegister: 8, SetName: p.in.Name, DestRegister: 8 + 2*regs + 2, IsDestRegSet: true},
				&expr.Socket{Key: expr.SocketKeyWildcard, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{0}},
				&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX | 1<<unix.NFTA_LOG_SNAPLEN,
					Group: LogGroup, Snaplen: logSnap, Data: []byte(LogTaken)},
				&expr.Verdict{Kind: expr.VerdictAccept})...)})
		}
	}
	return rules
}
