// Package nflog receives copies of packets that nftables rules log to an
// NFLOG group (the `log group N` statement): how the kernel tells the daemon
// of a flow it decided itself, without holding the packet.
//
// Like package queue it speaks nfnetlink directly on a netlink socket one
// goroutine owns, and parses messages in place: nothing on the receiving
// path allocates. The kernel batches records (up to a threshold of packets
// or a timeout, whichever comes first), so a burst of new flows costs the
// daemon one wakeup per batch, not one per flow.
package nflog

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"time"

	"github.com/rerouted/rerouted/internal/nlmsg"
	"golang.org/x/sys/unix"
)

// Record is one logged packet. Payload (the packet from its network
// header, up to the rule's snap length) and Prefix are only valid during
// the callback.
type Record struct {
	Prefix  []byte // the rule's log prefix
	Payload []byte
	Mark    uint32
	UID     uint32
	GID     uint32
	HasUID  bool // false when the packet had no full socket
	Hook    uint8
}

// nfnetlink_log constants (linux/netfilter/nfnetlink_log.h).
const (
	subsysULOG     = 4
	msgPacket      = 0
	msgConfig      = 1
	cfgCmd         = 1
	cfgMode        = 2
	cfgNlbufsiz    = 3
	cfgTimeout     = 4 // in hundredths of a second
	cfgQthresh     = 5
	cmdBind        = 1
	cmdUnbind      = 2
	copyPacket     = 2
	attrPacketHdr  = 1
	attrMark       = 2
	attrPayload    = 9
	attrPrefix     = 10
	attrUID        = 11
	attrGID        = 14
	defaultSnaplen = 128
)

// Options for Open.
type Options struct {
	Rcvbuf int           // SO_RCVBUFFORCE; records that do not fit are lost (ErrLost)
	Flush  time.Duration // the kernel sends a batch at least this often (default 50 ms)
	Batch  int           // ...or once it holds this many records (default 64)
}

// Group is one bound NFLOG group.
type Group struct {
	Num  uint16
	nl   *nlmsg.Conn
	buf  []byte
	seq  uint32
	done chan struct{}
}

// ErrLost is passed to onError when the socket's buffer overflowed and
// the kernel dropped records: whoever relies on them must resynchronise.
var ErrLost = errors.New("nflog: records were lost (receive buffer overflow)")

// Open binds group num in the caller's network namespace. A group another
// program has bound is refused (EBUSY).
func Open(num uint16, o Options) (*Group, error) {
	if o.Flush <= 0 {
		o.Flush = 50 * time.Millisecond
	}
	if o.Batch <= 0 {
		o.Batch = 64
	}
	nl, err := nlmsg.Dial(unix.NETLINK_NETFILTER, nlmsg.Config{ReadBuffer: o.Rcvbuf, ExtAck: true, ReadTimeout: 200 * time.Millisecond})
	if err != nil {
		return nil, fmt.Errorf("nflog group %d: %w", num, err)
	}
	g := &Group{Num: num, nl: nl, buf: make([]byte, 1<<20)}
	mode := binary.BigEndian.AppendUint32(nil, defaultSnaplen)
	mode = append(mode, copyPacket, 0)
	b := nlmsg.AppendAttr(nil, cfgCmd, []byte{cmdBind})
	b = nlmsg.AppendAttr(b, cfgMode, mode)
	b = nlmsg.AppendBE32(b, cfgNlbufsiz, 128<<10)
	b = nlmsg.AppendBE32(b, cfgTimeout, uint32(max(1, o.Flush/(10*time.Millisecond))))
	b = nlmsg.AppendBE32(b, cfgQthresh, uint32(o.Batch))
	if err := g.config(b); err != nil {
		nl.Close()
		return nil, fmt.Errorf("nflog group %d: bind (is another program logging to this group?): %w", num, err)
	}
	return g, nil
}

// config sends a configuration message and waits for its acknowledgement,
// skipping records that arrive meanwhile.
func (g *Group) config(attrs []byte) error {
	g.seq++
	msg := nlmsg.AppendHeader(make([]byte, 0, nlmsg.HeaderLen+nlmsg.NfgenLen+len(attrs)), subsysULOG<<8|msgConfig, unix.NLM_F_REQUEST|unix.NLM_F_ACK, g.seq)
	msg = nlmsg.AppendNfgen(msg, unix.AF_UNSPEC, g.Num)
	msg = append(msg, attrs...)
	nlmsg.End(msg, 0)
	if errno := g.nl.Send(msg); errno != 0 {
		return errno
	}
	for {
		n, errno := g.nl.Recv(g.buf, 0)
		if errno != 0 {
			return errno
		}
		for b := g.buf[:n]; len(b) >= nlmsg.HeaderLen; {
			h, payload, rest, err := nlmsg.Split(b)
			if err != nil {
				return fmt.Errorf("reply: %w", err)
			}
			if h.Type == unix.NLMSG_ERROR && h.Seq == g.seq {
				return nlmsg.Error(payload)
			}
			b = rest
		}
	}
}

// Start starts the reader: every record reaches handle, on one goroutine,
// until ctx is done. Receive errors (ErrLost among them) go to onError and
// do not stop it.
func (g *Group) Start(ctx context.Context, handle func(*Record), onError func(error)) {
	g.done = make(chan struct{})
	go func() {
		defer close(g.done)
		var r Record
		for ctx.Err() == nil {
			n, errno := g.nl.Recv(g.buf, 0)
			switch errno {
			case 0:
			case unix.EAGAIN, unix.EINTR:
				continue
			case unix.ENOBUFS:
				onError(ErrLost)
				continue
			default:
				onError(fmt.Errorf("nflog group %d: %w", g.Num, errno))
				time.Sleep(10 * time.Millisecond)
				continue
			}
			for b := g.buf[:n]; len(b) >= nlmsg.HeaderLen; {
				h, payload, rest, err := nlmsg.Split(b)
				if err != nil {
					onError(fmt.Errorf("nflog group %d: %w", g.Num, err))
					break
				}
				if h.Type == subsysULOG<<8|msgPacket && len(payload) >= nlmsg.NfgenLen && parse(payload[nlmsg.NfgenLen:], &r) {
					handle(&r)
				}
				b = rest
			}
		}
	}()
}

// parse reads a packet record's attributes in place.
func parse(b []byte, r *Record) bool {
	*r = Record{}
	for len(b) >= nlmsg.AttrHeaderLen {
		typ, v, rest, ok := nlmsg.SplitAttr(b)
		if !ok {
			return false
		}
		switch typ & nlmsg.TypeMask {
		case attrPacketHdr: // { be16 hw_protocol; u8 hook; u8 pad }
			if len(v) >= 3 {
				r.Hook = v[2]
			}
		case attrMark:
			r.Mark = be32(v)
		case attrPayload:
			r.Payload = v
		case attrPrefix:
			for len(v) > 0 && v[len(v)-1] == 0 {
				v = v[:len(v)-1]
			}
			r.Prefix = v
		case attrUID:
			r.UID, r.HasUID = be32(v), true
		case attrGID:
			r.GID = be32(v)
		}
		b = rest
	}
	return r.Payload != nil
}

func be32(v []byte) uint32 {
	if len(v) < 4 {
		return 0
	}
	return binary.BigEndian.Uint32(v)
}

// Close stops the reader, unbinds the group and closes the socket.
func (g *Group) Close() error {
	if g.done != nil {
		<-g.done
	}
	err := g.config(nlmsg.AppendAttr(nil, cfgCmd, []byte{cmdUnbind}))
	if cerr := g.nl.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("nflog group %d: close: %w", g.Num, err)
	}
	return nil
}
