package nftdp

import (
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
	"github.com/rerouted/rerouted/internal/nftdp/prefilter"
)

func TestInstallAddDeleteRemove(t *testing.T) {
	ns := worldtest.NS(t)
	// An unrelated table of the host's must survive everything we do.
	if err := ns.Nft("table inet hostfw {\n chain input { type filter hook input priority 0; }\n}\n"); err != nil {
		t.Fatal(err)
	}

	var d *Datapath
	if err := ns.Do(func() (err error) { d, err = Install(7, 2, false, 0, prefilter.Filter{HonorMarks: true}); return err }); err != nil {
		t.Fatal(err)
	}
	t.Logf("queue method: %s", d.QueueMethod)
	listing, err := ns.Run("nft", "list", "table", "inet", TableName)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"type route hook output priority mangle + 10",
		"type filter hook prerouting priority raw",
		"map tcp_out4", "map tcp_in4", "map udp_out6", "map icmp_in6", "set udp_pass4", "set icmp_pass6",
		"queue num 7-8",                                     // nft queue or xt NFQUEUE, fanned out over two queues
		"icmp type 3", "icmp type 11-12", "icmpv6 type 1-4", // errors to readdress
	} {
		if !strings.Contains(listing, want) {
			t.Errorf("table lacks %q:\n%s", want, listing)
		}
	}
	if !strings.Contains(listing, "bypass") || !strings.Contains(listing, "fanout") {
		t.Errorf("the queue rule lacks bypass or fanout:\n%s", listing)
	}

	entries := []Entry{
		{Proto: ipproto.TCP, Src: ap("198.51.100.2:40312"), Dst: ap("192.0.2.80:80"), NewSrc: ap("203.0.113.2:40312"), Mark: 100},
		{Proto: ipproto.TCP, Src: ap("198.51.100.2:40313"), Dst: ap("192.0.2.80:80"), NewSrc: ap("203.0.113.2:51000"), Mark: 0x12345678},
		{Proto: ipproto.TCP, Src: ap("[2001:db8:a::2]:40314"), Dst: ap("[2001:db8:80::80]:443"), NewSrc: ap("[2001:db8:b::2]:40314"), Mark: 100},
	}
	if err := d.Add(entries...); err != nil {
		t.Fatal(err)
	}
	got, err := d.Entries()
	if err != nil {
		t.Fatal(err)
	}
	sortEntries(got)
	if !slices.Equal(got, entries) {
		t.Fatalf("Entries() = %+v\nwant %+v", got, entries)
	}
	in, err := ns.Run("nft", "list", "map", "inet", TableName, "tcp_in4")
	if err != nil {
		t.Fatal(err)
	}
	// The reply view: translated address and port first, then the server;
	// the socket's address and port in maps of their own.
	if !strings.Contains(in, "203.0.113.2 . 51000 . 192.0.2.80 . 80 : 198.51.100.2") {
		t.Errorf("in4 lacks the reply element:\n%s", in)
	}
	for m, want := range map[string]string{
		"tcp_in6":    "2001:db8:b::2 . 40314 . 2001:db8:80::80 . 443 : 2001:db8:a::2",
		"tcp_dport4": "203.0.113.2 . 51000 . 192.0.2.80 . 80 : 40313",
		"tcp_sport4": "198.51.100.2 . 40313 . 192.0.2.80 . 80 : 51000",
		"tcp_mark4":  "198.51.100.2 . 40313 . 192.0.2.80 . 80 : 0x12345678",
		"tcp_out6":   "2001:db8:a::2 . 40314 . 2001:db8:80::80 . 443 : 2001:db8:b::2",
	} {
		if l, err := ns.Run("nft", "list", "map", "inet", TableName, m); err != nil || !strings.Contains(l, want) {
			t.Errorf("%s lacks %q (err %v):\n%s", m, want, err, l)
		}
	}
	// The IPv6 translation rule writes the address with only the
	// pseudo-header checksum flag, as nft itself does.
	if rules, _ := ns.Run("nft", "--debug=netlink", "list", "chain", "inet", TableName, "output"); !strings.Contains(rules, "16b @ network header + 8 csum_type 0 csum_off 0 csum_flags 0x1") {
		t.Errorf("no IPv6 address write with csum_flags 0x1:\n%s", rules)
	}

	// One transaction, in order: a tuple deleted and added again (a new
	// socket reusing it) ends with the new element.
	reused := entries[0]
	reused.NewSrc = ap("203.0.113.2:40999")
	if err := d.Apply([]Op{{Entry: entries[0], Delete: true}, {Entry: reused}, {Entry: entries[1], Delete: true}, {Entry: entries[2], Delete: true}}); err != nil {
		t.Fatal(err)
	}
	if got, _ := d.Entries(); len(got) != 1 || got[0] != reused {
		t.Fatalf("after delete and re-add: %+v", got)
	}
	// A failed transaction changes nothing.
	if err := d.Apply([]Op{{Entry: entries[1]}, {Entry: entries[0], Delete: true}}); err == nil {
		t.Fatal("deleting a missing element succeeded")
	}
	if got, _ := d.Entries(); len(got) != 1 || got[0] != reused {
		t.Fatalf("a failed transaction left %+v", got)
	}

	// A second Install (a restart) adopts the table: its elements stay,
	// its rules are replaced (here: one queue instead of two).
	d.Close()
	var d2 *Datapath
	if err := ns.Do(func() (err error) { d2, err = Install(7, 1, false, 0, prefilter.Filter{HonorMarks: true}); return err }); err != nil {
		t.Fatal(err)
	}
	if !d2.Adopted || d2.Replaced {
		t.Errorf("second Install: adopted %v, replaced %v; want adopted", d2.Adopted, d2.Replaced)
	}
	if got, _ := d2.Entries(); len(got) != 1 || got[0] != reused {
		t.Fatalf("adopted table holds %+v, want %+v", got, reused)
	}
	if l, _ := ns.Run("nft", "list", "table", "inet", TableName); strings.Count(l, "queue num 7 ") == 0 || strings.Contains(l, "7-8") || strings.Count(l, "jump filter_syn") != 1 {
		t.Errorf("adopted table's rules not replaced exactly once:\n%s", l)
	}
	// The userspace datapath cannot take kernel translations over: it
	// replaces the table.
	d2.Close()
	var d3 *Datapath
	if err := ns.Do(func() (err error) { d3, err = Install(7, 1, true, 0, prefilter.Filter{HonorMarks: true}); return err }); err != nil {
		t.Fatal(err)
	}
	if !d3.Replaced || d3.Adopted {
		t.Errorf("userspace Install over a kernel table: adopted %v, replaced %v; want replaced", d3.Adopted, d3.Replaced)
	}
	d2 = d3
	if err := d2.Remove(); err != nil {
		t.Fatal(err)
	}
	tables, err := ns.Run("nft", "list", "tables")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(tables, TableName) || !strings.Contains(tables, "hostfw") {
		t.Fatalf("after Remove, tables = %q; want hostfw only", tables)
	}
}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func sortEntries(es []Entry) {
	slices.SortFunc(es, func(a, b Entry) int { return a.Src.Compare(b.Src) })
}

func TestUserspaceSets(t *testing.T) {
	ns := worldtest.NS(t)
	var d *Datapath
	if err := ns.Do(func() (err error) { d, err = Install(0, 1, true, 0, prefilter.Filter{HonorMarks: true}); return err }); err != nil {
		t.Fatal(err)
	}
	defer d.Remove()
	e := Entry{Proto: ipproto.TCP, Src: ap("198.51.100.2:40312"), Dst: ap("192.0.2.80:80"), NewSrc: ap("203.0.113.2:40312"), Mark: 100}
	if err := d.Add(e); err != nil {
		t.Fatal(err)
	}
	sets := d.Sets()
	out, in := sets[0], sets[1]
	listing, err := ns.Run("nft", "list", "table", "inet", TableName)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"set " + out, "set " + in,
		"198.51.100.2 . 40312 . 192.0.2.80 . 80", // socket tuple: outbound packets queued
		"203.0.113.2 . 40312 . 192.0.2.80 . 80",  // reply view of the wire tuple: inbound queued
	} {
		if !strings.Contains(listing, want) {
			t.Errorf("listing lacks %q:\n%s", want, listing)
		}
	}
	// Three for ICMP errors; outbound and inbound selectors for each
	// family and protocol; the prefilter's marked SYNs and marked new UDP
	// and echo flows (its chains are jumped to: one jump for SYNs, one
	// for each family's UDP and echo).
	if n := strings.Count(listing, "queue num 0"); n != 3+12+2 || strings.Contains(listing, "map ") {
		t.Errorf("want 17 queue rules, found %d, and no maps:\n%s", n, listing)
	}
	if n, m := strings.Count(listing, "jump filter_syn"), strings.Count(listing, "jump filter_new"); n != 1 || m != 4 {
		t.Errorf("want 1 jump to filter_syn and 4 to filter_new, found %d and %d:\n%s", n, m, listing)
	}
	if err := d.Delete(e); err != nil {
		t.Fatal(err)
	}
}

// UDP and echo flows, translated and passed, both families: the elements
// land in their protocol's sets, come back from Entries, and count packets
// for Uses.
func TestDatagramEntries(t *testing.T) {
	ns := worldtest.NS(t)
	var d *Datapath
	if err := ns.Do(func() (err error) { d, err = Install(0, 1, false, 0, prefilter.Filter{HonorMarks: true}); return err }); err != nil {
		t.Fatal(err)
	}
	defer d.Remove()
	entries := []Entry{
		{Proto: ipproto.UDP, Src: ap("198.51.100.2:5353"), Dst: ap("192.0.2.53:53"), NewSrc: ap("203.0.113.2:5353"), Mark: 100},
		{Proto: ipproto.UDP, Src: ap("198.51.100.2:5354"), Dst: ap("192.0.2.53:53"), NewSrc: ap("198.51.100.2:5354"), Pass: true},
		{Proto: ipproto.ICMP, Src: ap("198.51.100.2:77"), Dst: ap("192.0.2.80:77"), NewSrc: ap("203.0.113.2:77"), Mark: 100},
		{Proto: ipproto.ICMPv6, Src: ap("[2001:db8:a::2]:78"), Dst: ap("[2001:db8:80::80]:78"), NewSrc: ap("[2001:db8:b::2]:78"), Mark: 100},
		{Proto: ipproto.ICMPv6, Src: ap("[2001:db8:a::2]:79"), Dst: ap("[2001:db8:80::80]:79"), NewSrc: ap("[2001:db8:a::2]:79"), Pass: true},
	}
	if err := d.Add(entries...); err != nil {
		t.Fatal(err)
	}
	got, err := d.Entries()
	if err != nil {
		t.Fatal(err)
	}
	sortEntries(got)
	want := slices.Clone(entries)
	sortEntries(want)
	if !slices.Equal(got, want) {
		t.Fatalf("Entries() = %+v\nwant %+v", got, want)
	}
	for set, elem := range map[string]string{
		"udp_in4":    "203.0.113.2 . 5353 . 192.0.2.53 . 53 : 198.51.100.2",
		"udp_pass4":  "198.51.100.2 . 5354 . 192.0.2.53 . 53",
		"icmp_in4":   "203.0.113.2 . 77 . 192.0.2.80 . 77 : 198.51.100.2",
		"icmp_pass6": "2001:db8:a::2 . 79 . 2001:db8:80::80 . 79",
	} {
		kind := "map"
		if strings.Contains(set, "pass") {
			kind = "set"
		}
		l, err := ns.Run("nft", "list", kind, "inet", TableName, set)
		// nft prints an element's counter between its key and its data.
		if bare := strings.ReplaceAll(l, " counter packets 0 bytes 0", ""); err != nil || !strings.Contains(bare, elem) || bare == l {
			t.Errorf("%s lacks %q with a counter (err %v):\n%s", set, elem, err, l)
		}
	}
	uses, err := d.Uses()
	if err != nil || len(uses) != 3*2+2 { // three translations, both ways; two passes
		t.Fatalf("Uses() = %+v, %v", uses, err)
	}
	if err := d.Apply([]Op{{Entry: Entry{Proto: 132, Src: ap("198.51.100.2:1"), Dst: ap("192.0.2.1:1"), NewSrc: ap("203.0.113.2:1")}}}); !errors.Is(err, ErrProtocol) {
		t.Errorf("SCTP entry: %v, want ErrProtocol", err)
	}
	if err := d.Apply([]Op{{Entry: Entry{Proto: ipproto.TCP, Src: ap("198.51.100.2:1"), Dst: ap("192.0.2.1:1"), Pass: true}}}); !errors.Is(err, ErrProtocol) {
		t.Errorf("TCP pass entry: %v, want ErrProtocol", err)
	}
	if err := d.Delete(entries...); err != nil {
		t.Fatal(err)
	}
	if got, _ := d.Entries(); len(got) != 0 {
		t.Fatalf("after Delete: %+v", got)
	}
}
