package queue

import (
	"encoding/binary"
	"testing"

	"github.com/rerouted/rerouted/internal/nlmsg"
)

func attr(typ uint16, v []byte) []byte { return nlmsg.AppendAttr(nil, typ, v) }

// packetMsg builds the attributes of an NFQNL_MSG_PACKET as the kernel does.
func packetMsg(id uint32, hook uint8, mark, uid uint32, payload []byte) []byte {
	hdr := binary.BigEndian.AppendUint32(nil, id)
	hdr = append(hdr, 0x08, 0x00, hook) // hw_protocol, hook
	b := attr(attrPacketHdr, hdr)
	b = append(b, attr(attrMark, binary.BigEndian.AppendUint32(nil, mark))...)
	b = append(b, attr(attrUID, binary.BigEndian.AppendUint32(nil, uid))...)
	b = append(b, attr(attrGID, binary.BigEndian.AppendUint32(nil, uid+1))...)
	b = append(b, attr(attrSkbInfo, binary.BigEndian.AppendUint32(nil, skbCsumNotRdy|skbGSO))...)
	return append(b, attr(attrPayload, payload)...)
}

func TestParsePacket(t *testing.T) {
	payload := []byte{0x45, 1, 2, 3, 4, 5, 6}
	var p Packet
	if !parsePacket(packetMsg(77, HookLocalOut, 100, 1000, payload), &p) {
		t.Fatal("parsePacket rejected a well-formed message")
	}
	if p.ID != 77 || p.Hook != HookLocalOut || p.Mark != 100 || !p.HasUID || p.UID != 1000 || p.GID != 1001 ||
		!p.Partial || !p.GSO || string(p.Payload) != string(payload) {
		t.Fatalf("parsed %+v", p)
	}
	// No payload, or no header: not a packet we can give a verdict to.
	if parsePacket(attr(attrPacketHdr, make([]byte, 7)), &p) {
		t.Error("accepted a message without payload")
	}
	if parsePacket(attr(attrPayload, payload), &p) {
		t.Error("accepted a message without packet id")
	}
	// A truncated attribute must not be read past its end.
	if parsePacket([]byte{200, 0, 1, 0, 1, 2}, &p) {
		t.Error("accepted a truncated attribute")
	}
}

func TestParseAllocatesNothing(t *testing.T) {
	msg := packetMsg(1, HookPreRouting, 0, 0, make([]byte, 1500))
	var p Packet
	if a := testing.AllocsPerRun(1000, func() { parsePacket(msg, &p) }); a != 0 {
		t.Fatalf("parsePacket allocates %.1f times", a)
	}
}

// A verdict is batched as header + packet + padding, and encodes the
// NFQA_VERDICT_HDR, NFQA_MARK and NFQA_PAYLOAD attributes.
func TestVerdictEncoding(t *testing.T) {
	q := &Queue{Num: 3}
	pkt := []byte{1, 2, 3, 4, 5}
	if err := q.verdict(9, verdictAccept, true, 100, pkt); err != nil {
		t.Fatal(err)
	}
	if q.nv != 1 || q.niov != 3 {
		t.Fatalf("batched %d verdicts in %d iovecs, want 1 in 3", q.nv, q.niov)
	}
	h := q.hdrs[0][:q.iov[0].Len]
	ne := binary.NativeEndian
	total := int(ne.Uint32(h))
	if total != len(h)+len(pkt)+3 || ne.Uint16(h[4:]) != subsysQueue<<8|msgVerdict || binary.BigEndian.Uint16(h[18:]) != 3 {
		t.Fatalf("netlink header: len %d type %#x queue %d", total, ne.Uint16(h[4:]), binary.BigEndian.Uint16(h[18:]))
	}
	a := h[nlmsg.HeaderLen+nlmsg.NfgenLen:]
	if ne.Uint16(a[2:]) != attrVerdict || binary.BigEndian.Uint32(a[4:]) != verdictAccept || binary.BigEndian.Uint32(a[8:]) != 9 {
		t.Fatalf("verdict attribute % x", a[:12])
	}
	if ne.Uint16(a[14:]) != attrMark || binary.BigEndian.Uint32(a[16:]) != 100 {
		t.Fatalf("mark attribute % x", a[12:20])
	}
	if ne.Uint16(a[20:]) != uint16(4+len(pkt)) || ne.Uint16(a[22:]) != attrPayload {
		t.Fatalf("payload attribute % x", a[20:24])
	}
	if q.iov[1].Base != &pkt[0] {
		t.Fatal("the packet was copied instead of pointed at")
	}
	if a := testing.AllocsPerRun(100, func() {
		q.nv, q.niov, q.bytes = 0, 0, 0
		q.verdict(9, verdictAccept, false, 0, nil)
	}); a != 0 {
		t.Fatalf("verdict allocates %.1f times", a)
	}
}
