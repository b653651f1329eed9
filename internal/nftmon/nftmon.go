// Package nftmon watches the kernel's nftables notifications for what other
// programs do to one table: an `nft flush ruleset`, a deleted map, a rule
// slipped into a chain.
package nftmon

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/mdlayher/netlink/nlenc"
	"github.com/rerouted/rerouted/internal/nlmsg"
	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// Damage is what other programs did to the table in one of their
// transactions, as the kernel's nftables notifications tell it.
type Damage struct {
	At      time.Time // when the first of its notifications was read
	PortID  uint32    // the netlink port that made the change; for nft, its pid
	By      string    // who that is: "pid N (comm)", as far as can be told
	Lost    []string  // objects deleted, e.g. "table", "chain output", "set tcp_out4"
	Changed []string  // objects others added to: "rule in chain output", "elements in set tcp_out4"
	// Elements: others deleted elements of the flow sets; Foreign: they
	// added elements or rules of their own.
	Elements, Foreign bool
	// Overflow: notifications were lost (the socket's buffer overflowed);
	// what happened is unknown and the whole table must be checked.
	Overflow bool
}

// Table reports whether the table itself is gone.
func (d *Damage) Table() bool {
	for _, l := range d.Lost {
		if l == "table" {
			return true
		}
	}
	return false
}

func (d *Damage) String() string {
	var parts []string
	if d.Overflow {
		parts = append(parts, "notifications lost: table checked")
	}
	if len(d.Lost) > 0 {
		parts = append(parts, "deleted: "+strings.Join(d.Lost, ", "))
	}
	if len(d.Changed) > 0 {
		parts = append(parts, "added: "+strings.Join(d.Changed, ", "))
	}
	return strings.Join(parts, "; ")
}

// Monitor reads the kernel's nftables notifications (NFNLGRP_NFTABLES) and
// reports the changes other programs make to one table: an `nft
// flush ruleset`, a `delete table`, a deleted map, a rule slipped into a
// chain. Its socket belongs to the goroutine that calls Next.
//
// The daemon's own per-flow transactions are filtered out in the kernel
// (a socket filter on the sending port), so the monitor costs the packet
// path nothing but the notification the kernel builds for each element.
type Monitor struct {
	c      *netlink.Conn
	table  string    // the inet table watched
	ours   [2]uint32 // the table owner's own ports: per-flow and general
	damage *Damage   // being collected, until its transaction's NEWGEN
}

// Open subscribes to nftables notifications about the inet table, leaving
// out the changes sent from the netlink ports ours (the table owner's own
// sockets). Call it before anything can damage the table, and Close it
// before removing the table.
func Open(table string, ours [2]uint32) (*Monitor, error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{Groups: 1 << (unix.NFNLGRP_NFTABLES - 1)})
	if err != nil {
		return nil, fmt.Errorf("nftables notifications: %w", err)
	}
	m := &Monitor{c: c, table: table, ours: ours}
	// The datapath's own changes, the per-flow transactions above all,
	// are the bulk of the notifications: drop them in the kernel.
	// nlmsg_pid is in host byte order; a BPF word load reads network
	// order.
	filter, err := bpf.Assemble([]bpf.Instruction{
		bpf.LoadAbsolute{Off: 12, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: swap32(m.ours[0]), SkipTrue: 1},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: swap32(m.ours[1]), SkipFalse: 1},
		bpf.RetConstant{Val: 0},
		bpf.RetConstant{Val: 0xffffffff},
	})
	if err == nil {
		err = c.SetBPF(filter)
	}
	if err == nil {
		// A burst of others' changes (a flush of a big ruleset) must not
		// overflow the socket: that loses the details, not the event.
		err = nlmsg.ForceReadBuffer(c, 4<<20)
	}
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("nftables notifications: %w", err)
	}
	return m, nil
}

func swap32(v uint32) uint32 { return v>>24 | v>>8&0xff00 | v<<8&0xff0000 | v<<24 }

// Close closes the notification socket; a blocked Next returns.
func (m *Monitor) Close() error { return m.c.Close() }

// SetDeadline bounds the next Next.
func (m *Monitor) SetDeadline(t time.Time) error { return m.c.SetReadDeadline(t) }

// Next blocks until another program has committed a transaction that
// changed rerouted's table, and returns what it did.
func (m *Monitor) Next() (*Damage, error) {
	for {
		msgs, err := m.c.Receive()
		if err != nil {
			if errors.Is(err, unix.ENOBUFS) {
				return &Damage{At: time.Now(), Overflow: true}, nil
			}
			return nil, err
		}
		for _, msg := range msgs {
			if d := m.note(msg); d != nil {
				return d, nil
			}
		}
	}
}

// note records one notification; at the end of a transaction that damaged
// the table (its NEWGEN), it returns the damage.
func (m *Monitor) note(msg netlink.Message) *Damage {
	if uint16(msg.Header.Type)>>8 != nfnlSubsysNFT || msg.Header.PID == m.ours[0] || msg.Header.PID == m.ours[1] {
		return nil
	}
	typ := uint16(msg.Header.Type) & 0xff
	if typ == unix.NFT_MSG_NEWGEN {
		d := m.damage
		m.damage = nil
		return d
	}
	// nfgenmsg: family, version, resource id; then attributes.
	if len(msg.Data) < 4 || msg.Data[0] != unix.NFPROTO_INET {
		return nil
	}
	ad, err := netlink.NewAttributeDecoder(msg.Data[4:])
	if err != nil {
		return nil
	}
	var table, name, chain string
	for ad.Next() {
		switch ad.Type() {
		case 1: // NFTA_{TABLE_NAME, CHAIN_TABLE, RULE_TABLE, SET_TABLE, SET_ELEM_LIST_TABLE}
			table = nlenc.String(ad.Bytes())
		case 2: // NFTA_{RULE_CHAIN, SET_NAME, SET_ELEM_LIST_SET}
			name = nlenc.String(ad.Bytes())
		case 3: // NFTA_CHAIN_NAME
			chain = nlenc.String(ad.Bytes())
		}
	}
	if table != m.table {
		return nil
	}
	lost, changed := "", ""
	elements, foreign := false, false
	switch typ {
	case unix.NFT_MSG_DELTABLE, nftMsgDestroyTable:
		lost = "table"
	case unix.NFT_MSG_DELCHAIN, nftMsgDestroyChain:
		lost = "chain " + chain
	case unix.NFT_MSG_DELRULE, nftMsgDestroyRule:
		lost = "rules of chain " + name
	case unix.NFT_MSG_DELSET, nftMsgDestroySet:
		lost = "set " + name
	case unix.NFT_MSG_DELSETELEM, nftMsgDestroySetElem:
		lost, elements = "elements of set "+name, true
	case unix.NFT_MSG_NEWRULE:
		changed, foreign = "rule in chain "+name, true
	case unix.NFT_MSG_NEWSETELEM:
		changed, foreign = "elements in set "+name, true
	default:
		return nil // new tables, chains, sets: nothing of ours is lost
	}
	if m.damage == nil {
		m.damage = &Damage{At: time.Now(), PortID: msg.Header.PID, By: sender(msg.Header.PID)}
	}
	d := m.damage
	d.Elements = d.Elements || elements
	d.Foreign = d.Foreign || foreign
	if lost != "" && !slices.Contains(d.Lost, lost) {
		d.Lost = append(d.Lost, lost)
	}
	if changed != "" && !slices.Contains(d.Changed, changed) {
		d.Changed = append(d.Changed, changed)
	}
	return nil
}

// sender names the program behind a netlink port, read at once: nft is
// gone a moment after its transaction. A program's first netlink socket
// gets its pid as port id, and nft has one.
func sender(port uint32) string {
	if port == 0 {
		return "the kernel"
	}
	if comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", port)); err == nil {
		return fmt.Sprintf("pid %d (%s)", port, strings.TrimSpace(string(comm)))
	}
	return fmt.Sprintf("pid %d (exited)", port)
}

// nfnlSubsysNFT is nftables' netlink subsystem (NFNL_SUBSYS_NFTABLES).
const nfnlSubsysNFT = 10

// The DESTROY messages (kernel 6.3+: delete if present) are notified as
// DEL; recognised all the same.
const (
	nftMsgDestroyTable   = 0x1a
	nftMsgDestroyChain   = 0x1b
	nftMsgDestroyRule    = 0x1c
	nftMsgDestroySet     = 0x1d
	nftMsgDestroySetElem = 0x1e
)
