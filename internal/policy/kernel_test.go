package policy

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
)

func TestKernelRules(t *testing.T) {
	cfg, err := Parse("t.toml", []byte(`
[[uplink]]
name = "isp-b"
mark = 100

[[rule]]
name = "exempt"
uplink = "default"
dst = ["192.0.2.0/25", "192.0.2.128/25", "192.0.2.200/32", "2001:db8::/32"]

[[rule]]
name = "web"
uplink = "isp-b"
protocol = ["tcp"]
dport = [80, "8000-8100"]
not_dst = ["198.51.100.0/24"]
uid = [1000, 1001]

[[rule]]
name = "crawler"
uplink = "isp-b"
process = "crawler"
`))
	if err != nil {
		t.Fatal(err)
	}
	ks := cfg.KernelRules()
	if len(ks) != 3 {
		t.Fatalf("%d rules", len(ks))
	}
	ex := ks[0]
	if ex.Queue || !ex.Exact || fmt.Sprint(ex.Dst.Ranges) != "[[{192.0.2.0 192.0.2.255}] [{2001:db8:: 2001:db8:ffff:ffff:ffff:ffff:ffff:ffff}]]" {
		t.Errorf("exempt: %+v", ex)
	}
	web := ks[1]
	if !web.Queue || !web.Exact || fmt.Sprint(web.Protocols) != "[tcp]" || fmt.Sprint(web.Dports) != "[80 8000-8100]" ||
		fmt.Sprint(web.UIDs) != "[1000 1001]" || fmt.Sprint(web.NotDst.Ranges[0]) != "[{198.51.100.0 198.51.100.255}]" || web.NotDst.Ranges[1] != nil {
		t.Errorf("web: %+v", web)
	}
	if ks[2].Exact || !ks[2].Queue {
		t.Errorf("crawler: %+v", ks[2])
	}
}

func TestPrefiltered(t *testing.T) {
	cfg, err := Parse("t.toml", []byte(`
[[uplink]]
name = "isp-b"
mark = 100

[[rule]]
name = "exempt"
uplink = "default"
dst = ["192.0.2.128/25"]

[[rule]]
name = "web"
uplink = "isp-b"
dport = [80]

[[rule]]
name = "crawler"
uplink = "isp-b"
process = "crawler"
protocol = "udp"
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		proto  ipproto.Proto
		dst    string
		queued bool
		why    string
	}{
		{ipproto.TCP, "192.0.2.200:80", false, `rule "exempt" (uplink = "default") exempts it`},
		{ipproto.TCP, "192.0.2.80:80", true, `rule "web" matches it in the kernel`},
		{ipproto.TCP, "192.0.2.80:81", false, "no rule can match it"},
		{ipproto.UDP, "192.0.2.80:53", true, `rule "crawler" may match it`},
	} {
		q, why := cfg.Prefiltered(&Flow{Proto: c.proto, Dst: netip.MustParseAddrPort(c.dst), HasUID: true})
		if q != c.queued || !strings.Contains(why, c.why) {
			t.Errorf("%s %s: %v %q, want %v %q", c.proto, c.dst, q, why, c.queued, c.why)
		}
	}
}

func TestMergePorts(t *testing.T) {
	got := fmt.Sprint(mergePorts([]PortRange{{Lo: 85, Hi: 85}, {Lo: 80, Hi: 90}, {Lo: 91, Hi: 95}, {Lo: 100, Hi: 100}, {Lo: 1, Hi: 2}}))
	if want := "[1-2 80-95 100]"; got != want {
		t.Errorf("merged %s, want %s", got, want)
	}
}
