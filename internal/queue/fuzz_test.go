package queue

import (
	"bytes"
	"encoding/binary"
	"reflect"
	"testing"
	"unsafe"
)

// encode is a packet message holding what p holds, as the kernel lays it
// out (packetMsg's attributes, with the out device and without the uid
// when p has none).
func encode(p *Packet) []byte {
	be := func(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
	hdr := append(be(p.ID), 0x86, 0xdd, p.Hook)
	b := attr(attrPacketHdr, hdr)
	b = append(b, attr(attrMark, be(p.Mark))...)
	b = append(b, attr(attrOutDev, be(p.OutDev))...)
	if p.HasUID {
		b = append(b, attr(attrUID, be(p.UID))...)
	}
	b = append(b, attr(attrGID, be(p.GID))...)
	var info uint32
	if p.Partial {
		info |= skbCsumNotRdy
	}
	if p.GSO {
		info |= skbGSO
	}
	b = append(b, attr(attrSkbInfo, be(info))...)
	return append(b, attr(attrPayload, p.Payload)...)
}

// within reports whether v lies inside b's memory.
func within(v, b []byte) bool {
	if len(v) == 0 {
		return true
	}
	start, end := uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(unsafe.Pointer(unsafe.SliceData(b)))+uintptr(len(b))
	p := uintptr(unsafe.Pointer(unsafe.SliceData(v)))
	return p >= start && p+uintptr(len(v)) <= end
}

// FuzzParsePacket: no packet message the kernel (or anything else) hands
// the queue makes parsePacket read outside it or panic; a message it
// accepts has a payload inside the message, and what it read encodes into
// a message that parses back to the same packet.
func FuzzParsePacket(f *testing.F) {
	f.Add(packetMsg(77, HookLocalOut, 100, 1000, []byte{0x45, 0, 0, 20}))
	f.Add(packetMsg(1, HookPreRouting, 0, 0, make([]byte, 1500)))
	f.Add(packetMsg(0xffffffff, 0xff, 0xffffffff, 0xffffffff, nil))
	f.Add(attr(attrPacketHdr, make([]byte, 7)))                                          // no payload
	f.Add(attr(attrPayload, []byte{0x60, 0, 0, 0}))                                      // no header
	f.Add([]byte{200, 0, 1, 0, 1, 2})                                                    // truncated attribute
	f.Add(append(attr(attrPacketHdr, make([]byte, 6)), attr(attrPayload, []byte{1})...)) // short header
	f.Add(attr(attrMark|0x8000, []byte{1, 2}))                                           // flags, short value
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		var p Packet
		orig := bytes.Clone(b)
		ok := parsePacket(b, &p)
		if !bytes.Equal(b, orig) {
			t.Fatal("parsePacket changed its input")
		}
		if !ok {
			return
		}
		if p.Payload == nil || !within(p.Payload, b) {
			t.Fatalf("accepted with payload %p (%d bytes) outside the message", unsafe.SliceData(p.Payload), len(p.Payload))
		}
		var again Packet
		if !parsePacket(encode(&p), &again) {
			t.Fatalf("the re-encoded %+v is refused", p)
		}
		if !bytes.Equal(again.Payload, p.Payload) {
			t.Fatalf("payload % x reads back as % x", p.Payload, again.Payload)
		}
		again.Payload, p.Payload = nil, nil
		if !reflect.DeepEqual(again, p) {
			t.Fatalf("parsed %+v, re-encoded reads back as %+v", p, again)
		}
	})
}
