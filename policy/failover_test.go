package policy

import (
	"strings"
	"testing"
)

const twoUplinks = `
[[uplink]]
name = "isp-b"
mark = 100
fallback = "isp-c"

[[uplink]]
name = "isp-c"
mark = 200
`

func TestUplinkLists(t *testing.T) {
	cfg, err := Parse("t.toml", []byte(twoUplinks+`
[[rule]]
name = "list"
uplink = ["isp-b", "isp-c", "default"]
on_down = "drop"
dport = [80]
`))
	if err != nil {
		t.Fatal(err)
	}
	a := cfg.Rules[0].Action
	if a.Kind != ActUplink || a.Mark != 100 || len(a.Choices) != 3 || a.Choices[1].Uplink.Mark != 200 || a.Choices[2].Uplink != nil || !a.DropWhenDown {
		t.Errorf("action %+v", a)
	}
	if cfg.Uplinks[0].Fallback != cfg.Uplinks[1] {
		t.Errorf("fallback %+v", cfg.Uplinks[0].Fallback)
	}
}

func TestUplinkListErrors(t *testing.T) {
	for _, c := range []struct{ rule, want string }{
		{`uplink = ["isp-b", "nope"]`, `t.toml:12:1: unknown uplink "nope"`},
		{`uplink = ["isp-b", "isp-b"]`, `uplink "isp-b" is listed twice`},
		{`uplink = ["default", "isp-b"]`, `"default" is always up`},
		{`uplink = []`, `uplink must name at least one`},
		{"uplink = \"isp-b\"\non_down = \"later\"", `on_down must be "default"`},
		{"mark = 5\non_down = \"drop\"", `on_down goes with uplink`},
	} {
		_, err := Parse("t.toml", []byte(twoUplinks+"\n[[rule]]\n"+c.rule+"\n"))
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.rule, err, c.want)
		}
	}
	_, err := Parse("t.toml", []byte("[[uplink]]\nname = \"b\"\nmark = 1\nfallback = \"c\"\n"))
	if err == nil || !strings.Contains(err.Error(), `t.toml:4:1: unknown uplink "c"`) {
		t.Errorf("unknown fallback: %v", err)
	}
}
