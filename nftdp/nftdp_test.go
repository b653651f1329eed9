package nftdp

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/networld/worldtest"
)

func TestInstallAddDeleteRemove(t *testing.T) {
	ns := worldtest.NS(t)
	// An unrelated table of the host's must survive everything we do.
	if err := ns.Nft("table inet hostfw {\n chain input { type filter hook input priority 0; }\n}\n"); err != nil {
		t.Fatal(err)
	}

	var d *Datapath
	if err := ns.Do(func() (err error) { d, err = Install(7, 2, false); return err }); err != nil {
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
		"map out4", "map in4",
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
		{Src: ap("198.51.100.2:40312"), Dst: ap("192.0.2.80:80"), NewSrc: ap("203.0.113.2:40312"), Mark: 100},
		{Src: ap("198.51.100.2:40313"), Dst: ap("192.0.2.80:80"), NewSrc: ap("203.0.113.2:51000"), Mark: 0x12345678},
		{Src: ap("[2001:db8:a::2]:40314"), Dst: ap("[2001:db8:80::80]:443"), NewSrc: ap("[2001:db8:b::2]:40314"), Mark: 100},
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
	in, err := ns.Run("nft", "list", "map", "inet", TableName, "in4")
	if err != nil {
		t.Fatal(err)
	}
	// The reply view: translated address and port first, then the server.
	if !strings.Contains(in, "203.0.113.2 . 51000 . 192.0.2.80 . 80 : 198.51.100.2 . 40313") {
		t.Errorf("in4 lacks the reply element:\n%s", in)
	}
	in6, err := ns.Run("nft", "list", "map", "inet", TableName, "in6")
	if err != nil || !strings.Contains(in6, "2001:db8:b::2 . 40314 . 2001:db8:80::80 . 443 : 2001:db8:a::2 . 40314") {
		t.Errorf("in6 lacks the reply element (err %v):\n%s", err, in6)
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

	// A second Install (a restart after a crash) replaces the stale table.
	var d2 *Datapath
	if err := ns.Do(func() (err error) { d2, err = Install(7, 1, false); return err }); err != nil {
		t.Fatal(err)
	}
	if !d2.Replaced {
		t.Error("second Install did not report replacing the stale table")
	}
	d.Close()
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
	if err := ns.Do(func() (err error) { d, err = Install(0, 1, true); return err }); err != nil {
		t.Fatal(err)
	}
	defer d.Remove()
	e := Entry{Src: ap("198.51.100.2:40312"), Dst: ap("192.0.2.80:80"), NewSrc: ap("203.0.113.2:40312"), Mark: 100}
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
	if strings.Count(listing, "queue num 0") != 8 || strings.Contains(listing, "map ") {
		t.Errorf("want eight queue rules (SYN; outbound and inbound for each family; three for ICMP errors) and no maps:\n%s", listing)
	}
	if err := d.Delete(e); err != nil {
		t.Fatal(err)
	}
}
