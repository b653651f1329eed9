package nftdp

import (
	"encoding/binary"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"github.com/rerouted/rerouted/internal/nlmsg"
	"golang.org/x/sys/unix"
)

// The per-flow transaction is built by hand on a socket of its own: one
// write carries the whole batch and one read collects the answer, where the
// general-purpose library takes nine syscalls and a few dozen allocations
// per transaction (measured: ~28 µs against ~12 µs, more under load). The
// translation rules are sent the same way, for a payload write the library
// cannot express (see addrWrite). Everything else (installing, listing,
// removing the table) goes through google/nftables.

// nfnetlink and nf_tables message constants (linux/netfilter/nfnetlink.h,
// nf_tables.h).
const (
	nfnlBatchBegin   = 0x10
	nfnlBatchEnd     = 0x11
	nfnlSubsysNFT    = 10
	nftMsgNewRule    = 6
	nftMsgDelRule    = 8
	nftMsgNewSetElem = 12
	nftMsgDelSetElem = 14
	attrRuleTable    = 1 // NFTA_RULE_TABLE
	attrRuleChain    = 2 // NFTA_RULE_CHAIN
	attrRuleExprs    = 4 // NFTA_RULE_EXPRESSIONS
	attrExprName     = 1 // NFTA_EXPR_NAME
	attrExprData     = 2 // NFTA_EXPR_DATA
	attrPayloadBase  = 2 // NFTA_PAYLOAD_BASE
	attrPayloadOff   = 3 // NFTA_PAYLOAD_OFFSET
	attrPayloadLen   = 4 // NFTA_PAYLOAD_LEN
	attrPayloadSreg  = 5 // NFTA_PAYLOAD_SREG
	attrCsumType     = 6 // NFTA_PAYLOAD_CSUM_TYPE
	attrCsumOffset   = 7 // NFTA_PAYLOAD_CSUM_OFFSET
	attrCsumFlags    = 8 // NFTA_PAYLOAD_CSUM_FLAGS
	attrElemTable    = 1 // NFTA_SET_ELEM_LIST_TABLE
	attrElemSet      = 2 // NFTA_SET_ELEM_LIST_SET
	attrElemElements = 3 // NFTA_SET_ELEM_LIST_ELEMENTS
	attrListElem     = 1 // NFTA_LIST_ELEM
	attrElemKey      = 1 // NFTA_SET_ELEM_KEY
	attrElemData     = 2 // NFTA_SET_ELEM_DATA
	attrDataValue    = 1 // NFTA_DATA_VALUE
	attrSetFieldLen  = 1 // NFTA_SET_FIELD_LEN
)

// batchConn is the socket for the batches nftdp builds by hand (flow
// elements, translation rules, mark maps), and its buffers.
type batchConn struct {
	nl   *nlmsg.Conn
	seq  uint32
	wbuf []byte
	rbuf []byte
}

func openBatchConn() (*batchConn, error) {
	nl, err := nlmsg.Dial(unix.NETLINK_NETFILTER, nlmsg.Config{})
	if err != nil {
		return nil, fmt.Errorf("nftables socket: %w", err)
	}
	return &batchConn{nl: nl, wbuf: make([]byte, 0, 64<<10), rbuf: make([]byte, 64<<10)}, nil
}

func (c *batchConn) close() error { return c.nl.Close() }

// portID is the netlink port of the per-flow socket: the kernel names it as
// the sender of the notifications of our own transactions.
func (c *batchConn) portID() uint32 { return c.nl.PortID() }

// transact sends changes to the protocols' outbound and inbound sets (or
// pass sets) as one batch and waits for its outcome: all applied, or none.
func (c *batchConn) transact(changes []Op, setsOf func(*Entry) *proto) error {
	return c.send(c.flowBatch(changes, setsOf))
}

// flowBatch builds transact's batch; last is the sequence number of its
// last message, the one acknowledged.
func (c *batchConn) flowBatch(changes []Op, setsOf func(*Entry) *proto) (b []byte, last uint32) {
	b = c.header(c.wbuf[:0], nfnlBatchBegin, unix.NLM_F_REQUEST, unix.AF_UNSPEC, nfnlSubsysNFT)
	for i := 0; i < len(changes); {
		p := setsOf(&changes[i].Entry)
		del, pass := changes[i].Delete, changes[i].Pass
		j := i
		for j < len(changes) && changes[j].Delete == del && changes[j].Pass == pass && setsOf(&changes[j].Entry) == p {
			j++
		}
		// The sets to write, by role: outbound keys are the socket's
		// tuple, inbound ones the reply's view of the wire tuple.
		sets := p.flowSets()
		if pass {
			sets = [6]*nftables.Set{5: p.pass}
		} else {
			sets[5] = nil
		}
		lastSet := len(sets) - 1
		for lastSet > 0 && sets[lastSet] == nil {
			lastSet--
		}
		typ := uint16(nftMsgNewSetElem)
		flags := uint16(unix.NLM_F_REQUEST | unix.NLM_F_CREATE)
		if del {
			typ, flags = nftMsgDelSetElem, unix.NLM_F_REQUEST
		}
		for k, set := range sets {
			if set == nil {
				continue
			}
			ack := uint16(0)
			if j == len(changes) && k == lastSet {
				ack = unix.NLM_F_ACK // the batch's last message
			}
			start := len(b)
			b = c.header(b, nfnlSubsysNFT<<8|typ, flags|ack, unix.NFPROTO_INET, 0)
			last = c.seq
			b = nlmsg.AppendString(b, attrElemTable, TableName)
			b = nlmsg.AppendString(b, attrElemSet, set.Name)
			list := len(b)
			b = nlmsg.OpenAttr(b)
			for _, ch := range changes[i:j] {
				e := len(b)
				b = nlmsg.OpenAttr(b)
				var key [40]byte
				var val [16]byte
				var kl, vl int
				if k < 3 || k == 5 { // outbound and pass: the socket's tuple
					kl = putTuple(key[:], ch.Src, ch.Dst)
				} else {
					kl = putTuple(key[:], ch.NewSrc, ch.Dst)
				}
				switch k {
				case 0: // out: the new source address
					vl = putAddr(val[:], ch.NewSrc.Addr())
				case 1: // outPort
					vl = 2
					binary.BigEndian.PutUint16(val[:], ch.NewSrc.Port())
				case 2: // outMark
					vl = 4
					binary.NativeEndian.PutUint32(val[:], ch.Mark)
				case 3: // in: the socket's address
					vl = putAddr(val[:], ch.Src.Addr())
				case 4: // inPort
					vl = 2
					binary.BigEndian.PutUint16(val[:], ch.Src.Port())
				}
				b = dataAttr(b, attrElemKey, key[:kl])
				if !del && set.IsMap {
					b = dataAttr(b, attrElemData, val[:vl])
				}
				nlmsg.CloseAttr(b, e, attrListElem|nlmsg.Nested)
			}
			nlmsg.CloseAttr(b, list, attrElemElements|nlmsg.Nested)
			nlmsg.End(b, start)
		}
		i = j
	}
	return c.endBatch(b), last
}

// ruleMsg is a rule to append to a chain of the table.
type ruleMsg struct {
	chain string
	exprs [][]byte // each an expression's NFTA_EXPR_NAME and NFTA_EXPR_DATA
}

// addRules empties the chains flush names and appends rules, in one
// transaction.
func (c *batchConn) addRules(rules []ruleMsg, flush []string) error {
	return c.send(c.rulesBatch(rules, flush))
}

func (c *batchConn) rulesBatch(rules []ruleMsg, flush []string) (b []byte, last uint32) {
	b = c.header(c.wbuf[:0], nfnlBatchBegin, unix.NLM_F_REQUEST, unix.AF_UNSPEC, nfnlSubsysNFT)
	{
		for _, chain := range flush {
			r := ruleMsg{chain: chain}
			start := len(b)
			b = c.header(b, nfnlSubsysNFT<<8|nftMsgDelRule, unix.NLM_F_REQUEST, unix.NFPROTO_INET, 0)
			b = nlmsg.AppendString(b, attrRuleTable, TableName)
			b = nlmsg.AppendString(b, attrRuleChain, r.chain)
			nlmsg.End(b, start)
		}
	}
	for i, r := range rules {
		flags := uint16(unix.NLM_F_REQUEST | unix.NLM_F_CREATE | unix.NLM_F_APPEND)
		if i == len(rules)-1 {
			flags |= unix.NLM_F_ACK
		}
		start := len(b)
		b = c.header(b, nfnlSubsysNFT<<8|nftMsgNewRule, flags, unix.NFPROTO_INET, 0)
		last = c.seq
		b = nlmsg.AppendString(b, attrRuleTable, TableName)
		b = nlmsg.AppendString(b, attrRuleChain, r.chain)
		list := len(b)
		b = nlmsg.OpenAttr(b)
		for _, e := range r.exprs {
			el := len(b)
			b = nlmsg.OpenAttr(b)
			b = append(b, e...)
			nlmsg.CloseAttr(b, el, attrListElem|nlmsg.Nested)
		}
		nlmsg.CloseAttr(b, list, attrRuleExprs|nlmsg.Nested)
		nlmsg.End(b, start)
	}
	return c.endBatch(b), last
}

// addHostDataMaps creates maps whose data is in host byte order (marks),
// or finds them as they are, in one transaction. Their userdata says so,
// as nft's own does, so that nft prints their values right.
func (c *batchConn) addHostDataMaps(maps []*nftables.Set) error {
	return c.send(c.mapsBatch(maps))
}

func (c *batchConn) mapsBatch(maps []*nftables.Set) (b []byte, last uint32) {
	b = c.header(c.wbuf[:0], nfnlBatchBegin, unix.NLM_F_REQUEST, unix.AF_UNSPEC, nfnlSubsysNFT)
	for i, m := range maps {
		flags := uint16(unix.NLM_F_REQUEST | unix.NLM_F_CREATE)
		if i == len(maps)-1 {
			flags |= unix.NLM_F_ACK
		}
		start := len(b)
		b = c.header(b, nfnlSubsysNFT<<8|unix.NFT_MSG_NEWSET, flags, unix.NFPROTO_INET, 0)
		last = c.seq
		setFlags := uint32(unix.NFT_SET_MAP)
		if m.Concatenation {
			setFlags |= nftables.NFT_SET_CONCAT
		}
		b = nlmsg.AppendString(b, unix.NFTA_SET_TABLE, TableName)
		b = nlmsg.AppendString(b, unix.NFTA_SET_NAME, m.Name)
		b = nlmsg.AppendBE32(b, unix.NFTA_SET_FLAGS, setFlags)
		b = nlmsg.AppendBE32(b, unix.NFTA_SET_KEY_TYPE, m.KeyType.GetNFTMagic())
		b = nlmsg.AppendBE32(b, unix.NFTA_SET_KEY_LEN, m.KeyType.Bytes)
		b = nlmsg.AppendBE32(b, unix.NFTA_SET_DATA_TYPE, m.DataType.GetNFTMagic())
		b = nlmsg.AppendBE32(b, unix.NFTA_SET_DATA_LEN, m.DataType.Bytes)
		b = nlmsg.AppendBE32(b, unix.NFTA_SET_ID, uint32(0x7272_0000+i))
		if m.Concatenation {
			// The key's fields' lengths, as nft gives them.
			desc := len(b)
			b = nlmsg.OpenAttr(b)
			concat := len(b)
			b = nlmsg.OpenAttr(b)
			for _, t := range nftables.ConcatSetTypeElements(m.KeyType) {
				el := len(b)
				b = nlmsg.OpenAttr(b)
				b = nlmsg.AppendBE32(b, attrSetFieldLen, t.Bytes)
				nlmsg.CloseAttr(b, el, unix.NFTA_LIST_ELEM|nlmsg.Nested)
			}
			nlmsg.CloseAttr(b, concat, nftables.NFTA_SET_DESC_CONCAT|nlmsg.Nested)
			nlmsg.CloseAttr(b, desc, unix.NFTA_SET_DESC|nlmsg.Nested)
		}
		ud := userdata.AppendUint32(nil, userdata.NFTNL_UDATA_SET_DATABYTEORDER, 1) // nft's BYTEORDER_HOST_ENDIAN
		if m.Comment != "" {
			ud = userdata.AppendString(ud, userdata.NFTNL_UDATA_SET_COMMENT, m.Comment)
		}
		b = nlmsg.AppendAttr(b, unix.NFTA_SET_USERDATA, ud)
		nlmsg.End(b, start)
	}
	return c.endBatch(b), last
}

// endBatch ends a batch begun with nfnlBatchBegin.
func (c *batchConn) endBatch(b []byte) []byte {
	return c.header(b, nfnlBatchEnd, unix.NLM_F_REQUEST, unix.AF_UNSPEC, nfnlSubsysNFT)
}

// send writes a batch and reads until the acknowledgement of its last
// message, returning the first error the kernel reported.
func (c *batchConn) send(b []byte, last uint32) error {
	c.wbuf = b
	if errno := c.nl.Send(b); errno != 0 {
		return fmt.Errorf("nftables batch: %w", errno)
	}
	// The kernel processes the batch while we write: the answers are
	// waiting.
	var failed error
	for {
		n, errno := c.nl.Recv(c.rbuf, 0)
		if errno != 0 {
			return fmt.Errorf("nftables batch reply: %w", errno)
		}
		for r := c.rbuf[:n]; len(r) >= nlmsg.HeaderLen; {
			h, payload, rest, err := nlmsg.Split(r)
			if err != nil {
				return fmt.Errorf("nftables batch reply: %w", err)
			}
			if h.Type == unix.NLMSG_ERROR {
				if err := nlmsg.Error(payload); err != nil && failed == nil {
					failed = err
				}
				if h.Seq == last {
					return failed
				}
			}
			r = rest
		}
	}
}

// addrWrite is the payload expression that writes an address from
// registers at reg into the network header at off, fixing checksums: the
// IPv4 header checksum, and for both families the TCP checksum's
// pseudo-header part (csum_flags), which nft emits as "csum_type 0 csum_flags
// 0x1" for IPv6, where there is no header checksum.
func addrWrite(f *family, off, reg uint32) []byte {
	b := nlmsg.AppendString(nil, attrExprName, "payload")
	data := len(b)
	b = nlmsg.OpenAttr(b)
	b = nlmsg.AppendBE32(b, attrPayloadSreg, reg)
	b = nlmsg.AppendBE32(b, attrPayloadBase, unix.NFT_PAYLOAD_NETWORK_HEADER)
	b = nlmsg.AppendBE32(b, attrPayloadOff, off)
	b = nlmsg.AppendBE32(b, attrPayloadLen, uint32(f.addrLen))
	if f.addrLen == 4 {
		b = nlmsg.AppendBE32(b, attrCsumType, unix.NFT_PAYLOAD_CSUM_INET)
		b = nlmsg.AppendBE32(b, attrCsumOffset, 10)
	}
	b = nlmsg.AppendBE32(b, attrCsumFlags, unix.NFT_PAYLOAD_L4CSUM_PSEUDOHDR)
	nlmsg.CloseAttr(b, data, attrExprData|nlmsg.Nested)
	return b
}

// header appends a netlink and an nfgenmsg header; the length is filled in
// for fixed-size messages and patched by the caller for others.
func (c *batchConn) header(b []byte, typ, flags uint16, family uint8, resID uint16) []byte {
	c.seq++
	start := len(b)
	b = nlmsg.AppendHeader(b, typ, flags, c.seq)
	b = nlmsg.AppendNfgen(b, family, resID)
	nlmsg.End(b, start)
	return b
}

// dataAttr appends a nested attribute holding one NFTA_DATA_VALUE. Its
// length leaves out the value's padding, as it always has.
func dataAttr(b []byte, typ uint16, v []byte) []byte {
	outer := len(b)
	b = nlmsg.OpenAttr(b)
	b = nlmsg.AppendAttr(b, attrDataValue, v)
	nlmsg.PutAttrHeader(b[outer:], 2*nlmsg.AttrHeaderLen+len(v), typ|nlmsg.Nested)
	return b
}

// putTuple writes a . b as a concatenated key (address, port padded to a
// 32-bit register) and returns its length.
func putTuple(dst []byte, a, b netip.AddrPort) int {
	n := putAddrPort(dst, a)
	return n + putAddrPort(dst[n:], b)
}

// putAddr writes an address and returns its length.
func putAddr(dst []byte, a netip.Addr) int {
	if a.Is4() {
		a4 := a.As4()
		return copy(dst, a4[:])
	}
	a16 := a.As16()
	return copy(dst, a16[:])
}

func putAddrPort(dst []byte, ap netip.AddrPort) int {
	n := 4
	if a := ap.Addr(); a.Is4() {
		a4 := a.As4()
		copy(dst, a4[:])
	} else {
		a16 := a.As16()
		n = copy(dst, a16[:])
	}
	binary.BigEndian.PutUint16(dst[n:], ap.Port())
	dst[n+2], dst[n+3] = 0, 0
	return n + 4
}
