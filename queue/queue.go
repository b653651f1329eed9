// Package queue receives packets from an NFQUEUE and returns verdicts.
//
// The queue is configured fail-open (a full queue lets packets through
// rather than dropping them) and asks the kernel for the owning socket's uid
// and gid with every packet, which costs nothing extra.
package queue

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"

	nfqueue "github.com/florianl/go-nfqueue/v2"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Packet is one queued packet. Payload is only valid until the verdict.
type Packet struct {
	ID      uint32
	Payload []byte
	Mark    uint32
	UID     uint32
	GID     uint32
	HasUID  bool // false when the packet has no owning socket
	OutDev  uint32
}

// Queue is one bound NFQUEUE.
type Queue struct {
	Num uint16
	nf  *nfqueue.Nfqueue
	// ReadErrors counts receive errors (ENOBUFS: the kernel dropped
	// packets for lack of buffer space; with fail-open they went through).
	ReadErrors atomic.Uint64
}

// Open binds queue num in the caller's network namespace. rcvbuf is the
// socket receive buffer in bytes (set with SO_RCVBUFFORCE).
func Open(num uint16, rcvbuf int) (*Queue, error) {
	nf, err := nfqueue.Open(&nfqueue.Config{
		NfQueue:      num,
		MaxPacketLen: 0xffff,
		MaxQueueLen:  4096,
		Copymode:     nfqueue.NfQnlCopyPacket,
		Flags:        nfqueue.NfQaCfgFlagUIDGid | nfqueue.NfQaCfgFlagFailOpen,
	})
	if err != nil {
		return nil, fmt.Errorf("open nfqueue %d: %w", num, err)
	}
	q := &Queue{Num: num, nf: nf}
	if err := q.setRcvbuf(rcvbuf); err != nil {
		nf.Close()
		return nil, err
	}
	return q, nil
}

func (q *Queue) setRcvbuf(n int) error {
	rc, err := q.nf.Con.SyscallConn()
	if err != nil {
		return fmt.Errorf("nfqueue %d: %w", q.Num, err)
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, n)
	}); err != nil {
		return fmt.Errorf("nfqueue %d: %w", q.Num, err)
	}
	if serr != nil {
		return fmt.Errorf("nfqueue %d: SO_RCVBUFFORCE %d: %w", q.Num, n, serr)
	}
	return nil
}

// Start binds the queue; from its return on, every queued packet reaches
// handle, called on one goroutine until ctx is done. handle must give every
// packet a verdict. Errors reading the socket are passed to onError and do
// not stop the queue.
func (q *Queue) Start(ctx context.Context, handle func(*Packet), onError func(error)) error {
	var p Packet
	hook := func(a nfqueue.Attribute) int {
		if a.PacketID == nil || a.Payload == nil {
			return 0
		}
		p = Packet{ID: *a.PacketID, Payload: *a.Payload}
		if a.Mark != nil {
			p.Mark = *a.Mark
		}
		if a.UID != nil {
			p.UID, p.HasUID = *a.UID, true
		}
		if a.GID != nil {
			p.GID = *a.GID
		}
		if a.OutDev != nil {
			p.OutDev = *a.OutDev
		}
		handle(&p)
		return 0
	}
	errf := func(err error) int {
		if ctx.Err() != nil {
			return 1
		}
		var op *netlink.OpError
		if errors.As(err, &op) && errors.Is(op.Err, unix.ENOBUFS) {
			q.ReadErrors.Add(1)
		}
		onError(err)
		return 0
	}
	if err := q.nf.RegisterWithErrorFunc(ctx, hook, errf); err != nil {
		return fmt.Errorf("bind nfqueue %d: %w", q.Num, err)
	}
	return nil
}

// Accept lets the packet continue unchanged.
func (q *Queue) Accept(id uint32) error {
	return q.nf.SetVerdict(id, nfqueue.NfAccept)
}

// AcceptModified lets the rewritten packet continue with mark; the kernel
// routes it again because its source and mark changed.
func (q *Queue) AcceptModified(id uint32, mark uint32, pkt []byte) error {
	return q.nf.SetVerdictWithOption(id, nfqueue.NfAccept, nfqueue.WithMark(mark), nfqueue.WithAlteredPacket(pkt))
}

// Drop drops the packet.
func (q *Queue) Drop(id uint32) error {
	return q.nf.SetVerdict(id, nfqueue.NfDrop)
}

// Close unbinds and closes the queue socket. Packets queued from then on
// pass through the rule's bypass.
func (q *Queue) Close() error { return q.nf.Close() }
