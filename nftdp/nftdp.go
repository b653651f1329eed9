// Package nftdp programs rerouted's kernel datapath: one nftables table of
// its own, in which per-flow map elements translate every packet of a
// translated flow in both directions, and a queue rule hands the first packet
// of each new flow to the daemon.
//
// The table, for IPv4 TCP (inet family):
//
//	map out4 { ipv4_addr . inet_service . ipv4_addr . inet_service : ipv4_addr . inet_service . mark }
//	map in4  { ipv4_addr . inet_service . ipv4_addr . inet_service : ipv4_addr . inet_service }
//
//	chain output { type route hook output priority mangle + 10;
//	    meta oiftype loopback accept
//	    tcp flags & (fin|syn|rst|ack) == syn  queue num N bypass
//	    ip saddr . tcp sport . ip daddr . tcp dport  ->  @out4  ->  saddr, sport, mark }
//	chain prerouting { type filter hook prerouting priority raw;
//	    ip daddr . tcp dport . ip saddr . tcp sport  ->  @in4   ->  daddr, dport }
//
// With the userspace datapath the maps are replaced by key-only sets, uout4
// and uin4, whose rules queue every packet of a translated flow to the
// daemon, which rewrites it:
//
//	chain output     { ... tuple in @uout4: queue }
//	chain prerouting { reply tuple in @uin4: queue }
//
// Each translation rule does one lookup whose data (a concatenation) lands in
// registers, then writes the fields from those registers; so no write can
// change what a later lookup sees. nft's payload writes fix the IP and TCP
// checksums, offloaded ones included.
//
// Hooks: outbound translation runs after the host's own mark rules (mangle)
// and after conntrack, inbound before conntrack (raw): conntrack sees only the
// socket's own tuple in both directions, so a stateful firewall keeps working
// and no conntrack entry is needed at all.
package nftdp

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"sync"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/xt"
	"golang.org/x/sys/unix"
)

// TableName is the name of rerouted's inet table. Nothing else is touched.
const TableName = "rerouted"

// Priorities of the base chains.
const (
	OutputPriority     = -150 + 10 // NF_IP_PRI_MANGLE + 10: after the host's mark rules
	PreroutingPriority = -300      // NF_IP_PRI_RAW: before conntrack and routing
)

// Entry is the kernel state of one translated flow.
type Entry struct {
	Src, Dst netip.AddrPort // the socket's own tuple
	NewSrc   netip.AddrPort // what the wire sees instead of Src
	Mark     uint32         // fwmark put on every outbound packet
}

// Datapath is the installed table. Its netlink socket is used under mu, one
// transaction at a time.
type Datapath struct {
	mu        sync.Mutex
	conn      *nftables.Conn // setup, listing, removal
	elems     *elemConn      // per-flow transactions (elements.go)
	table     *nftables.Table
	out4, in4 *nftables.Set // the maps, or the userspace datapath's sets
	userspace bool
	// QueueMethod says how packets reach the queue: "nft queue" or, on
	// kernels without nft_queue, "xt NFQUEUE" through nft_compat.
	QueueMethod string
	// Replaced is true when a table left by an earlier run was removed.
	Replaced bool
}

// Install creates rerouted's table, replacing one left by an earlier run, in
// the caller's network namespace. Packets are queued to queues first ..
// first+total-1, spread by CPU. With userspace, every packet of a
// translated flow is queued instead of rewritten in the kernel.
func Install(first, total uint16, userspace bool) (*Datapath, error) {
	conn, err := nftables.New(nftables.AsLasting())
	if err != nil {
		return nil, fmt.Errorf("nftables netlink: %w", err)
	}
	d := &Datapath{conn: conn, table: &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}, userspace: userspace}
	if t, err := conn.ListTableOfFamily(TableName, nftables.TableFamilyINet); err == nil && t != nil {
		conn.DelTable(d.table)
		if err := conn.Flush(); err != nil {
			conn.CloseLasting()
			return nil, fmt.Errorf("remove stale table inet %s: %w", TableName, err)
		}
		d.Replaced = true
	}
	if err := d.build(first, total, true); err != nil {
		// Kernels built without CONFIG_NFT_QUEUE reject the native
		// statement; the xtables target through nft_compat does the same.
		if err2 := d.build(first, total, false); err2 != nil {
			conn.CloseLasting()
			return nil, fmt.Errorf("install table inet %s: with nft queue: %v; with xt NFQUEUE: %w", TableName, err, err2)
		}
	}
	if d.elems, err = openElemConn(d.out4.Name, d.in4.Name, !userspace); err != nil {
		d.Remove()
		return nil, err
	}
	return d, nil
}

// Remove deletes the table and everything in it, and closes the socket.
func (d *Datapath) Remove() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.conn.DelTable(d.table)
	err := d.conn.Flush()
	if cerr := d.closeSockets(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("remove table inet %s: %w", TableName, err)
	}
	return nil
}

// Close closes the socket and leaves the table in place, so that existing
// flows keep working while no daemon runs.
func (d *Datapath) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.closeSockets()
}

func (d *Datapath) closeSockets() error {
	err := d.conn.CloseLasting()
	if d.elems != nil {
		err = errors.Join(err, d.elems.close())
	}
	return err
}

func (d *Datapath) build(first, total uint16, native bool) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	c, t := d.conn, d.table
	c.AddTable(t)

	keyType, err := nftables.ConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService, nftables.TypeIPAddr, nftables.TypeInetService)
	if err != nil {
		return err
	}
	outData, _ := nftables.ConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService, nftables.TypeMark)
	inData, _ := nftables.ConcatSetType(nftables.TypeIPAddr, nftables.TypeInetService)
	if d.userspace {
		d.out4 = &nftables.Set{Table: t, Name: "uout4", Concatenation: true, KeyType: keyType,
			Comment: "socket tuples of translated flows: every packet to the daemon"}
		d.in4 = &nftables.Set{Table: t, Name: "uin4", Concatenation: true, KeyType: keyType,
			Comment: "translated tuples (reply view): every packet to the daemon"}
	} else {
		d.out4 = &nftables.Set{Table: t, Name: "out4", IsMap: true, Concatenation: true, KeyType: keyType, DataType: outData,
			Comment: "socket tuple : translated source . port . mark"}
		d.in4 = &nftables.Set{Table: t, Name: "in4", IsMap: true, Concatenation: true, KeyType: keyType, DataType: inData,
			Comment: "translated tuple (reply view) : socket address . port"}
	}
	for _, s := range []*nftables.Set{d.out4, d.in4} {
		if err := c.AddSet(s, nil); err != nil {
			return fmt.Errorf("add set %s: %w", s.Name, err)
		}
	}

	policy := nftables.ChainPolicyAccept
	out := c.AddChain(&nftables.Chain{Name: "output", Table: t, Type: nftables.ChainTypeRoute,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityRef(OutputPriority), Policy: &policy})
	pre := c.AddChain(&nftables.Chain{Name: "prerouting", Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(PreroutingPriority), Policy: &policy})

	// Loopback traffic never leaves the host: leave it alone.
	c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyOIFTYPE, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint16(unix.ARPHRD_LOOPBACK)},
		&expr.Verdict{Kind: expr.VerdictAccept},
	}})
	// Every SYN goes to the daemon, translated flows' retransmissions too:
	// the daemon checks that the socket is still the one it translated.
	c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: append(tcp4(),
		append(tcpFlags(0x17, 0x02), queueTo(first, total, native, true))...)})
	if d.userspace {
		c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: append(tcp4(),
			loadIP(12, 8), loadPort(0, 9), loadIP(16, 10), loadPort(2, 11),
			&expr.Lookup{SourceRegister: 8, SetName: d.out4.Name, SetID: d.out4.ID},
			queueTo(first, total, native, false))})
		c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: append(tcp4(),
			loadIP(16, 8), loadPort(2, 9), loadIP(12, 10), loadPort(0, 11),
			&expr.Lookup{SourceRegister: 8, SetName: d.in4.Name, SetID: d.in4.ID},
			queueTo(first, total, native, false))})
		return d.flush(native)
	}
	// Outbound: socket tuple -> new source, port, mark.
	c.AddRule(&nftables.Rule{Table: t, Chain: out, Exprs: append(tcp4(),
		loadIP(12, 8), loadPort(0, 9), loadIP(16, 10), loadPort(2, 11),
		&expr.Lookup{SourceRegister: 8, DestRegister: 12, IsDestRegSet: true, SetName: d.out4.Name, SetID: d.out4.ID},
		writeIP(12, 12), writePort(0, 13),
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 14},
	)})
	// Inbound: reply to the translated tuple -> the socket's address and port.
	c.AddRule(&nftables.Rule{Table: t, Chain: pre, Exprs: append(tcp4(),
		loadIP(16, 8), loadPort(2, 9), loadIP(12, 10), loadPort(0, 11),
		&expr.Lookup{SourceRegister: 8, DestRegister: 12, IsDestRegSet: true, SetName: d.in4.Name, SetID: d.in4.ID},
		writeIP(16, 12), writePort(2, 13),
	)})
	return d.flush(native)
}

func (d *Datapath) flush(native bool) error {
	if native {
		d.QueueMethod = "nft queue"
	} else {
		d.QueueMethod = "xt NFQUEUE"
	}
	return d.conn.Flush()
}

// tcpFlags matches TCP flags & mask == want.
func tcpFlags(mask, want byte) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{mask}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{want}},
	}
}

// queueTo queues to first..first+total-1 with bypass: without a daemon the
// packet goes on as if the rule were not there. With byCPU the queue is the
// packet's CPU's; else a hash of the address pair picks it, the same for
// every packet between two hosts in either direction. A flow whose every
// packet is queued must use the hash: packets of one flow arrive on either
// CPU, and two workers would reinject them out of order (seen: a duplicate
// segment to a TIME_WAIT socket, the peer's RST, the TIME_WAIT killed).
func queueTo(first, total uint16, native, byCPU bool) expr.Any {
	fanout := total > 1 && byCPU
	if native {
		flag := expr.QueueFlagBypass
		if fanout {
			flag |= expr.QueueFlagFanout
		}
		return &expr.Queue{Num: first, Total: total, Flag: flag}
	}
	// struct xt_NFQ_info_v3 { u16 queuenum, queues_total, flags }, XT_ALIGNed;
	// flags: 1 bypass, 2 CPU fanout.
	info := make(xt.Unknown, 8)
	binary.NativeEndian.PutUint16(info[0:], first)
	binary.NativeEndian.PutUint16(info[2:], total)
	flags := uint16(1)
	if fanout {
		flags |= 2
	}
	binary.NativeEndian.PutUint16(info[4:], flags)
	return &expr.Target{Name: "NFQUEUE", Rev: 3, Info: &info}
}

// tcp4 matches IPv4 TCP in an inet chain.
func tcp4() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.NFPROTO_IPV4}},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
	}
}

func loadIP(off, reg uint32) expr.Any {
	return &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: 4}
}

func loadPort(off, reg uint32) expr.Any {
	return &expr.Payload{DestRegister: reg, Base: expr.PayloadBaseTransportHeader, Offset: off, Len: 2}
}

// writeIP sets an IPv4 address, fixing the header checksum and the TCP
// checksum's pseudo-header part.
func writeIP(off, reg uint32) expr.Any {
	return &expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: reg, Base: expr.PayloadBaseNetworkHeader,
		Offset: off, Len: 4, CsumType: expr.CsumTypeInet, CsumOffset: 10, CsumFlags: unix.NFT_PAYLOAD_L4CSUM_PSEUDOHDR}
}

// writePort sets a TCP port, fixing the TCP checksum.
func writePort(off, reg uint32) expr.Any {
	return &expr.Payload{OperationType: expr.PayloadWrite, SourceRegister: reg, Base: expr.PayloadBaseTransportHeader,
		Offset: off, Len: 2, CsumType: expr.CsumTypeInet, CsumOffset: 16}
}

// Sets returns the names of the per-flow sets or maps: outbound, inbound.
func (d *Datapath) Sets() (string, string) { return d.out4.Name, d.in4.Name }

// Op is one change to the flow maps.
type Op struct {
	Entry
	Delete bool
}

// Add installs the map elements of entries in one transaction.
func (d *Datapath) Add(entries ...Entry) error { return d.Apply(ops(entries, false)) }

// Delete removes the map elements of entries in one transaction.
func (d *Datapath) Delete(entries ...Entry) error { return d.Apply(ops(entries, true)) }

func ops(es []Entry, del bool) []Op {
	out := make([]Op, len(es))
	for i, e := range es {
		out[i] = Op{Entry: e, Delete: del}
	}
	return out
}

// ErrFamily is returned for entries that are not IPv4.
var ErrFamily = errors.New("only IPv4 flows are supported by this datapath")

// Apply makes the changes in order, in one transaction: all or none.
func (d *Datapath) Apply(changes []Op) error {
	if len(changes) == 0 {
		return nil
	}
	for _, c := range changes {
		if !c.Src.Addr().Is4() || !c.Dst.Addr().Is4() || !c.NewSrc.Addr().Is4() {
			return ErrFamily
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.elems.transact(changes); err != nil {
		return fmt.Errorf("apply %d flow changes: %w", len(changes), err)
	}
	return nil
}

// Entries lists the translated flows installed in the kernel maps (the
// kernel datapath; the userspace datapath's sets hold keys only).
func (d *Datapath) Entries() ([]Entry, error) {
	if d.userspace {
		return nil, errors.New("the userspace datapath keeps translations in the daemon")
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	els, err := d.conn.GetSetElements(d.out4)
	if err != nil {
		return nil, fmt.Errorf("list set out4: %w", err)
	}
	out := make([]Entry, 0, len(els))
	for _, el := range els {
		if len(el.Key) != 16 || len(el.Val) != 12 {
			return nil, fmt.Errorf("set out4: element of unexpected size %d:%d", len(el.Key), len(el.Val))
		}
		out = append(out, Entry{
			Src:    parseAddrPort(el.Key[0:8]),
			Dst:    parseAddrPort(el.Key[8:16]),
			NewSrc: parseAddrPort(el.Val[0:8]),
			Mark:   binary.NativeEndian.Uint32(el.Val[8:12]),
		})
	}
	return out, nil
}

func parseAddrPort(b []byte) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte(b[0:4])), binary.BigEndian.Uint16(b[4:6]))
}
