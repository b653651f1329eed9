package packet

import (
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket/layers"
	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/queue"
)

// With the userspace datapath every packet of a translated flow comes to
// the worker: outbound ones leave from the wire's source with the flow's
// mark, inbound ones reach the socket's own address; packets of no
// translated flow pass untouched.
func TestUserspaceForwardsBothWays(t *testing.T) {
	wd := newWorld(t, testPolicy)
	wd.s.Userspace = true
	wd.socket(ipproto.TCP, client, server, 7)
	wd.send(syn(t, client, server, 1460), 0)
	wd.w.EndBatch()
	wireSrc := netip.AddrPortFrom(ispB, client.Port())

	data := &layers.TCP{SrcPort: layers.TCPPort(client.Port()), DstPort: layers.TCPPort(server.Port()), ACK: true, PSH: true, Seq: 2, Ack: 9, Window: 500}
	n := len(wd.r.events)
	wd.send(serialize(t, client, server, layers.IPProtocolTCP, data, data), 0)
	ev := wd.since(n)
	if len(ev) != 1 || ev[0].kind != "modified" || ev[0].mark != markB {
		t.Fatalf("outbound: %+v", ev)
	}
	if src, dst, _ := wire(t, ev[0].pkt); src != wireSrc || dst != server {
		t.Fatalf("outbound left as %v -> %v", src, dst)
	}

	reply := &layers.TCP{SrcPort: layers.TCPPort(server.Port()), DstPort: layers.TCPPort(client.Port()), ACK: true, Seq: 9, Ack: 3, Window: 500}
	n = len(wd.r.events)
	wd.w.Handle(&queue.Packet{ID: 90, Hook: queue.HookPreRouting, Payload: serialize(t, server, wireSrc, layers.IPProtocolTCP, reply, reply)})
	ev = wd.since(n)
	if len(ev) != 1 || ev[0].kind != "packet" {
		t.Fatalf("inbound: %+v", ev)
	}
	if src, dst, _ := wire(t, ev[0].pkt); src != server || dst != client {
		t.Fatalf("inbound reached the socket as %v -> %v, want %v -> %v", src, dst, server, client)
	}

	if got := wd.s.Stats.Forwarded.Load(); got != 2 {
		t.Fatalf("forwarded = %d, want 2", got)
	}

	stranger := netip.MustParseAddrPort("198.51.100.2:5555") // no flow
	other := &layers.TCP{SrcPort: layers.TCPPort(server.Port()), DstPort: layers.TCPPort(stranger.Port()), ACK: true, Window: 500}
	n = len(wd.r.events)
	wd.w.Handle(&queue.Packet{ID: 91, Hook: queue.HookPreRouting, Payload: serialize(t, server, stranger, layers.IPProtocolTCP, other, other)})
	if ev := wd.since(n); len(ev) != 1 || ev[0].kind != "accept" {
		t.Fatalf("a packet of no flow: %+v", ev)
	}
	if got := wd.s.Stats.Forwarded.Load(); got != 2 {
		t.Fatalf("forwarded = %d after a packet of no flow, want 2: only rewritten packets count", got)
	}
}
