// Package nftbatch writes nf_tables batches by hand and sends them: one
// write carries a whole batch and one read collects the answer, where the
// general-purpose library (google/nftables) takes nine syscalls and a few
// dozen allocations per transaction (measured: ~28 µs against ~12 µs, more
// under load). nftdp sends its per-flow transactions this way, and the
// translation rules, for a payload write the library cannot express (see
// AddrWrite), and the maps whose data is in host order (HostDataMaps).
//
// A Writer builds a batch in a buffer it keeps, so that building one
// allocates nothing once the buffer has grown; a Conn sends it. What goes
// in a flow's elements is nftdp's to say: this package knows the messages.
package nftbatch

import (
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"github.com/rerouted/rerouted/internal/nlmsg"
	"golang.org/x/sys/unix"
)

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

// Writer builds batches about one inet table, numbering their messages.
// The zero Writer with a Table is ready; a batch stays valid until the
// next begins.
type Writer struct {
	Table string // the table every message is about
	seq   uint32
	buf   []byte
	// The batch's last message to acknowledge, so far; where the element
	// message being written and its list begin.
	last      uint32
	msg, list int
}

// Begin begins a batch of element messages (Elements).
func (w *Writer) Begin() {
	w.buf = w.header(w.buf[:0], nfnlBatchBegin, unix.NLM_F_REQUEST, unix.AF_UNSPEC, nfnlSubsysNFT)
	w.last = 0
}

// Elements begins a message that adds elements to set, or with del
// removes them; ack asks for its acknowledgement, which a batch's last
// message must do. Element adds each element, EndElements ends it.
func (w *Writer) Elements(set string, del, ack bool) {
	typ := uint16(nftMsgNewSetElem)
	flags := uint16(unix.NLM_F_REQUEST | unix.NLM_F_CREATE)
	if del {
		typ, flags = nftMsgDelSetElem, unix.NLM_F_REQUEST
	}
	if ack {
		flags |= unix.NLM_F_ACK
	}
	w.msg = len(w.buf)
	w.buf = w.header(w.buf, nfnlSubsysNFT<<8|typ, flags, unix.NFPROTO_INET, 0)
	w.last = w.seq
	w.buf = nlmsg.AppendString(w.buf, attrElemTable, w.Table)
	w.buf = nlmsg.AppendString(w.buf, attrElemSet, set)
	w.list = len(w.buf)
	w.buf = nlmsg.OpenAttr(w.buf)
}

// Element adds one element to the message Elements began: its key and,
// for a map's element being added, its data (nil: none).
func (w *Writer) Element(key, data []byte) {
	e := len(w.buf)
	w.buf = nlmsg.OpenAttr(w.buf)
	w.buf = dataAttr(w.buf, attrElemKey, key)
	if data != nil {
		w.buf = dataAttr(w.buf, attrElemData, data)
	}
	nlmsg.CloseAttr(w.buf, e, attrListElem|nlmsg.Nested)
}

// EndElements ends the message Elements began.
func (w *Writer) EndElements() {
	nlmsg.CloseAttr(w.buf, w.list, attrElemElements|nlmsg.Nested)
	nlmsg.End(w.buf, w.msg)
}

// End ends the batch Begin began and returns it, with the sequence number
// of the message whose acknowledgement ends the answer (for Conn.Send).
func (w *Writer) End() (b []byte, last uint32) {
	return w.endBatch(w.buf), w.last
}

// Rule is a rule to append to a chain of the table.
type Rule struct {
	Chain string
	Exprs [][]byte // each an expression's NFTA_EXPR_NAME and NFTA_EXPR_DATA
}

// Exprs marshals library expressions for a hand-built rule (Rule.Exprs).
func Exprs(es ...expr.Any) [][]byte {
	out := make([][]byte, len(es))
	for i, e := range es {
		b, err := expr.Marshal(byte(nftables.TableFamilyINet), e)
		if err != nil {
			panic(fmt.Sprintf("marshal %T: %v", e, err)) // a programming error: the expressions are fixed
		}
		out[i] = b
	}
	return out
}

// Rules is the batch that empties the chains flush names and appends
// rules (at least one).
func (w *Writer) Rules(rules []Rule, flush []string) (b []byte, last uint32) {
	b = w.header(w.buf[:0], nfnlBatchBegin, unix.NLM_F_REQUEST, unix.AF_UNSPEC, nfnlSubsysNFT)
	for _, chain := range flush { // each chain's rules out first, in the same transaction
		start := len(b)
		b = w.header(b, nfnlSubsysNFT<<8|nftMsgDelRule, unix.NLM_F_REQUEST, unix.NFPROTO_INET, 0)
		b = nlmsg.AppendString(b, attrRuleTable, w.Table)
		b = nlmsg.AppendString(b, attrRuleChain, chain)
		nlmsg.End(b, start)
	}
	for i, r := range rules {
		flags := uint16(unix.NLM_F_REQUEST | unix.NLM_F_CREATE | unix.NLM_F_APPEND)
		if i == len(rules)-1 {
			flags |= unix.NLM_F_ACK
		}
		start := len(b)
		b = w.header(b, nfnlSubsysNFT<<8|nftMsgNewRule, flags, unix.NFPROTO_INET, 0)
		last = w.seq
		b = nlmsg.AppendString(b, attrRuleTable, w.Table)
		b = nlmsg.AppendString(b, attrRuleChain, r.Chain)
		list := len(b)
		b = nlmsg.OpenAttr(b)
		for _, e := range r.Exprs {
			el := len(b)
			b = nlmsg.OpenAttr(b)
			b = append(b, e...)
			nlmsg.CloseAttr(b, el, attrListElem|nlmsg.Nested)
		}
		nlmsg.CloseAttr(b, list, attrRuleExprs|nlmsg.Nested)
		nlmsg.End(b, start)
	}
	return w.endBatch(b), last
}

// HostDataMaps is the batch that creates maps whose data is in host byte
// order (marks), or finds them as they are. Their userdata says so, as
// nft's own does, so that nft prints their values right: google/nftables
// cannot say it.
func (w *Writer) HostDataMaps(maps []*nftables.Set) (b []byte, last uint32) {
	b = w.header(w.buf[:0], nfnlBatchBegin, unix.NLM_F_REQUEST, unix.AF_UNSPEC, nfnlSubsysNFT)
	for i, m := range maps {
		flags := uint16(unix.NLM_F_REQUEST | unix.NLM_F_CREATE)
		if i == len(maps)-1 {
			flags |= unix.NLM_F_ACK
		}
		start := len(b)
		b = w.header(b, nfnlSubsysNFT<<8|unix.NFT_MSG_NEWSET, flags, unix.NFPROTO_INET, 0)
		last = w.seq
		setFlags := uint32(unix.NFT_SET_MAP)
		if m.Concatenation {
			setFlags |= nftables.NFT_SET_CONCAT
		}
		if m.Dynamic {
			setFlags |= unix.NFT_SET_EVAL // updated from the packet path
		}
		b = nlmsg.AppendString(b, unix.NFTA_SET_TABLE, w.Table)
		b = nlmsg.AppendString(b, unix.NFTA_SET_NAME, m.Name)
		b = nlmsg.AppendBE32(b, unix.NFTA_SET_FLAGS, setFlags)
		b = nlmsg.AppendBE32(b, unix.NFTA_SET_KEY_TYPE, m.KeyType.GetNFTMagic())
		b = nlmsg.AppendBE32(b, unix.NFTA_SET_KEY_LEN, m.KeyType.Bytes)
		b = nlmsg.AppendBE32(b, unix.NFTA_SET_DATA_TYPE, m.DataType.GetNFTMagic())
		b = nlmsg.AppendBE32(b, unix.NFTA_SET_DATA_LEN, m.DataType.Bytes)
		b = nlmsg.AppendBE32(b, unix.NFTA_SET_ID, uint32(0x7272_0000+i))
		if m.Concatenation {
			// The key's fields' lengths, as nft gives them, and the
			// size.
			desc := len(b)
			b = nlmsg.OpenAttr(b)
			if m.Size != 0 {
				b = nlmsg.AppendBE32(b, unix.NFTA_SET_DESC_SIZE, m.Size)
			}
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
	return w.endBatch(b), last
}

// endBatch ends a batch begun with nfnlBatchBegin, in the writer's buffer
// from now on (grown, it serves the next batch).
func (w *Writer) endBatch(b []byte) []byte {
	w.buf = w.header(b, nfnlBatchEnd, unix.NLM_F_REQUEST, unix.AF_UNSPEC, nfnlSubsysNFT)
	return w.buf
}

// Conn is the socket for hand-built batches, with the Writer that builds
// them.
type Conn struct {
	Writer
	nl   *nlmsg.Conn
	rbuf []byte
}

// Dial opens a socket for batches about table.
func Dial(table string) (*Conn, error) {
	// A reload swaps every rule in one batch, one sendmsg: a policy of
	// thousands of rules is megabytes, more than the default send buffer
	// takes (EMSGSIZE). The buffer is only a limit.
	nl, err := nlmsg.Dial(unix.NETLINK_NETFILTER, nlmsg.Config{WriteBuffer: maxBatch})
	if err != nil {
		return nil, fmt.Errorf("nftables socket: %w", err)
	}
	return &Conn{Writer: Writer{Table: table, buf: make([]byte, 0, 64<<10)}, nl: nl, rbuf: make([]byte, 64<<10)}, nil
}

// maxBatch is the largest batch the socket sends.
const maxBatch = 256 << 20

// Close closes the socket.
func (c *Conn) Close() error { return c.nl.Close() }

// PortID is the socket's netlink port: the kernel names it as the sender
// of the notifications of its transactions.
func (c *Conn) PortID() uint32 { return c.nl.PortID() }

// AddRules empties the chains flush names and appends rules, in one
// transaction.
func (c *Conn) AddRules(rules []Rule, flush []string) error {
	return c.Send(c.Rules(rules, flush))
}

// AddHostDataMaps creates maps whose data is in host byte order, or finds
// them as they are, in one transaction (see HostDataMaps).
func (c *Conn) AddHostDataMaps(maps []*nftables.Set) error {
	return c.Send(c.HostDataMaps(maps))
}

// Send writes a batch (b and last as the Writer's End, Rules or
// HostDataMaps return them) and reads until the acknowledgement of its last
// message, returning the first error the kernel reported.
func (c *Conn) Send(b []byte, last uint32) error {
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

// AddrWrite is the payload expression that writes an address from
// registers at reg into the network header at off, fixing checksums: the
// IPv4 header checksum, and for both families the TCP checksum's
// pseudo-header part (csum_flags), which nft emits as "csum_type 0 csum_flags
// 0x1" for IPv6, where there is no header checksum.
func AddrWrite(addrLen int, off, reg uint32) []byte {
	b := nlmsg.AppendString(nil, attrExprName, "payload")
	data := len(b)
	b = nlmsg.OpenAttr(b)
	b = nlmsg.AppendBE32(b, attrPayloadSreg, reg)
	b = nlmsg.AppendBE32(b, attrPayloadBase, unix.NFT_PAYLOAD_NETWORK_HEADER)
	b = nlmsg.AppendBE32(b, attrPayloadOff, off)
	b = nlmsg.AppendBE32(b, attrPayloadLen, uint32(addrLen))
	if addrLen == 4 {
		b = nlmsg.AppendBE32(b, attrCsumType, unix.NFT_PAYLOAD_CSUM_INET)
		b = nlmsg.AppendBE32(b, attrCsumOffset, 10)
	}
	b = nlmsg.AppendBE32(b, attrCsumFlags, unix.NFT_PAYLOAD_L4CSUM_PSEUDOHDR)
	nlmsg.CloseAttr(b, data, attrExprData|nlmsg.Nested)
	return b
}

// header appends a netlink and an nfgenmsg header; the length is filled in
// for fixed-size messages and patched by the caller for others.
func (w *Writer) header(b []byte, typ, flags uint16, family uint8, resID uint16) []byte {
	w.seq++
	start := len(b)
	b = nlmsg.AppendHeader(b, typ, flags, w.seq)
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
