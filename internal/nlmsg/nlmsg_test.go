package nlmsg

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/rerouted/rerouted/internal/testenv"
	"golang.org/x/sys/unix"
)

// A message built here reads back the same through this package and
// through mdlayher/netlink's own decoder.
func TestRoundTrip(t *testing.T) {
	b := AppendHeader(nil, 0x0a06, unix.NLM_F_REQUEST|unix.NLM_F_ACK, 7)
	b = AppendNfgen(b, unix.NFPROTO_INET, 0x1234)
	b = AppendString(b, 1, "rerouted")
	b = AppendBE32(b, 2, 0xdeadbeef)
	nest := len(b)
	b = OpenAttr(b)
	b = AppendAttr(b, 1, []byte{1, 2, 3})
	CloseAttr(b, nest, 3|Nested)
	End(b, 0)

	var m netlink.Message
	if err := m.UnmarshalBinary(b); err != nil {
		t.Fatalf("mdlayher/netlink rejects it: %v", err)
	}
	if int(m.Header.Length) != len(b) || m.Header.Type != 0x0a06 || m.Header.Sequence != 7 {
		t.Fatalf("header %+v, %d bytes", m.Header, len(b))
	}
	ad, err := netlink.NewAttributeDecoder(m.Data[NfgenLen:])
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for ad.Next() {
		switch ad.Type() {
		case 1:
			got = append(got, ad.String())
		case 2:
			got = append(got, string(ad.Bytes()))
		case 3:
			ad.Nested(func(n *netlink.AttributeDecoder) error {
				for n.Next() {
					got = append(got, string(n.Bytes()))
				}
				return nil
			})
		}
	}
	if err := ad.Err(); err != nil {
		t.Fatal(err)
	}
	if want := []string{"rerouted", "\xde\xad\xbe\xef", "\x01\x02\x03"}; len(got) != 3 || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("attributes %q, want %q", got, want)
	}

	h, payload, rest, err := Split(b)
	if err != nil || h.Len != uint32(len(b)) || h.Flags != unix.NLM_F_REQUEST|unix.NLM_F_ACK || len(rest) != 0 {
		t.Fatalf("Split: %+v, %d rest, %v", h, len(rest), err)
	}
	if payload[0] != unix.NFPROTO_INET || binary.BigEndian.Uint16(payload[2:]) != 0x1234 {
		t.Fatalf("nfgenmsg % x", payload[:4])
	}
	typ, v, after, ok := SplitAttr(payload[NfgenLen:])
	if !ok || typ != 1 || string(v) != "rerouted\x00" {
		t.Fatalf("first attribute: %d %q %v", typ, v, ok)
	}
	if typ, v, _, ok = SplitAttr(after); !ok || typ != 2 || binary.BigEndian.Uint32(v) != 0xdeadbeef {
		t.Fatalf("second attribute: %d % x %v", typ, v, ok)
	}
}

func TestSplitRejects(t *testing.T) {
	b := AppendHeader(nil, unix.NLMSG_NOOP, 0, 1)
	binary.NativeEndian.PutUint32(b, 15)
	if _, _, _, err := Split(b); !errors.Is(err, ErrMalformed) {
		t.Errorf("length 15: %v", err)
	}
	binary.NativeEndian.PutUint32(b, 17)
	if _, _, _, err := Split(b); !errors.Is(err, ErrMalformed) {
		t.Errorf("length past the end: %v", err)
	}
	// The last message's padding may be missing.
	b = append(AppendHeader(nil, unix.NLMSG_NOOP, 0, 1), 9)
	End(b, 0)
	if _, p, rest, err := Split(b); err != nil || !bytes.Equal(p, []byte{9}) || len(rest) != 0 {
		t.Errorf("unpadded last message: % x, %d rest, %v", p, len(rest), err)
	}
	if _, _, _, ok := SplitAttr([]byte{200, 0, 1, 0, 1, 2}); ok {
		t.Error("SplitAttr accepted a truncated attribute")
	}
	if _, _, _, ok := SplitAttr([]byte{3, 0, 1, 0}); ok {
		t.Error("SplitAttr accepted a length shorter than its header")
	}
}

func TestError(t *testing.T) {
	ne := binary.NativeEndian
	if err := Error(ne.AppendUint32(nil, 0)); err != nil {
		t.Errorf("ack: %v", err)
	}
	code := -int32(unix.ENOENT)
	if err := Error(ne.AppendUint32(nil, uint32(code))); err != unix.ENOENT {
		t.Errorf("ENOENT: %v", err)
	}
	if err := Error([]byte{1, 2}); !errors.Is(err, ErrMalformed) {
		t.Errorf("short: %v", err)
	}
}

// dial opens a NETLINK_ROUTE socket, which any user may. Dial is the code
// under test: its failure fails the test, but for a non-root user in a
// sandbox that forbids netlink, where it skips (fails under
// REROUTED_REQUIRE_E2E=1).
func dial(t *testing.T, cfg Config) *Conn {
	t.Helper()
	c, err := Dial(unix.NETLINK_ROUTE, cfg)
	switch {
	case err == nil:
		return c
	case os.Geteuid() == 0:
		t.Fatalf("Dial as root: %v", err)
	default:
		testenv.Skip(t, "no netlink for this user: %v", err)
	}
	return nil
}

// A request acknowledged by the kernel, over a real socket (any user may
// open NETLINK_ROUTE): neither the write nor the read allocates.
func TestConnAllocatesNothing(t *testing.T) {
	c := dial(t, Config{ReadTimeout: 5 * time.Second})
	if c.PortID() == 0 {
		t.Error("no port id")
	}
	req := make([]byte, 0, HeaderLen)
	buf := make([]byte, 4096)
	var seq uint32
	exchange := func() error {
		seq++
		req = AppendHeader(req[:0], unix.NLMSG_NOOP, unix.NLM_F_REQUEST|unix.NLM_F_ACK, seq)
		if errno := c.Send(req); errno != 0 {
			return errno
		}
		n, errno := c.Recv(buf, 0)
		if errno != 0 {
			return errno
		}
		h, payload, _, err := Split(buf[:n])
		if err != nil {
			return err
		}
		if h.Type != unix.NLMSG_ERROR || h.Seq != seq {
			return ErrMalformed
		}
		return Error(payload)
	}
	if err := exchange(); err != nil {
		t.Fatal(err)
	}
	if a := testing.AllocsPerRun(100, func() {
		if err := exchange(); err != nil {
			panic(err)
		}
	}); a != 0 {
		t.Fatalf("a request and its acknowledgement allocate %.1f times", a)
	}
	// Nothing waiting: a non-blocking read says so.
	if _, errno := c.Recv(buf, unix.MSG_DONTWAIT); errno != unix.EAGAIN {
		t.Fatalf("empty socket: %v", errno)
	}
	iov := []unix.Iovec{{Base: &req[0]}}
	iov[0].SetLen(len(req))
	seq++
	req = AppendHeader(req[:0], unix.NLMSG_NOOP, unix.NLM_F_REQUEST|unix.NLM_F_ACK, seq)
	if errno := c.Sendv(iov); errno != 0 {
		t.Fatalf("writev: %v", errno)
	}
	if n, errno := c.Recv(buf, 0); errno != 0 || n < HeaderLen+4 {
		t.Fatalf("writev's acknowledgement: %d bytes, %v", n, errno)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
}

// FuzzMessages: no input makes the decoder read outside its buffer or loop
// for ever, and what it finds re-encodes to the same bytes.
func FuzzMessages(f *testing.F) {
	b := AppendHeader(nil, 0x0300, unix.NLM_F_REQUEST, 1)
	b = AppendNfgen(b, unix.AF_UNSPEC, 3)
	b = AppendAttr(b, 1, []byte{0, 0, 0, 1, 8, 0, 3})
	b = AppendString(b, 2|Nested, "x")
	End(b, 0)
	f.Add(b)
	f.Add(append(b, b...))
	f.Add([]byte{16, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		for len(b) >= HeaderLen {
			h, payload, rest, err := Split(b)
			if err != nil {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("Split: %v", err)
				}
				return
			}
			if len(rest) >= len(b) || int(h.Len) != HeaderLen+len(payload) {
				t.Fatalf("Split: length %d, payload %d, rest %d of %d", h.Len, len(payload), len(rest), len(b))
			}
			// The header re-encodes as it was.
			var hb [HeaderLen]byte
			PutHeader(hb[:], h)
			if !bytes.Equal(hb[:], b[:HeaderLen]) {
				t.Fatalf("header % x re-encodes as % x", b[:HeaderLen], hb)
			}
			if h.Type == unix.NLMSG_ERROR {
				_ = Error(payload)
			}
			// Attributes, after an nfgenmsg, re-encode as they were.
			if len(payload) >= NfgenLen {
				a := payload[NfgenLen:]
				for {
					typ, v, next, ok := SplitAttr(a)
					if !ok {
						break
					}
					if len(next) >= len(a) {
						t.Fatalf("SplitAttr did not advance: %d of %d", len(next), len(a))
					}
					re := AppendAttr(nil, typ, v)
					if n := min(len(re), len(a)); !bytes.Equal(re[:AttrHeaderLen+len(v)], a[:AttrHeaderLen+len(v)]) || len(a)-len(next) != n {
						t.Fatalf("attribute % x re-encodes as % x", a[:len(a)-len(next)], re)
					}
					a = next
				}
			}
			b = rest
		}
	})
}

// The socket blocks (the library's is non-blocking): an empty read waits
// for SO_RCVTIMEO.
func TestConnBlocks(t *testing.T) {
	c := dial(t, Config{ReadTimeout: 50 * time.Millisecond})
	defer c.Close()
	start := time.Now()
	if _, errno := c.Recv(make([]byte, 64), 0); errno != unix.EAGAIN {
		t.Fatalf("empty socket: %v, want EAGAIN after the timeout", errno)
	}
	if d := time.Since(start); d < 40*time.Millisecond {
		t.Fatalf("an empty read returned after %v: the socket does not block", d)
	}
}
