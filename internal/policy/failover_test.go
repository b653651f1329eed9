package policy

import (
	"strings"
	"testing"
	"time"
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

func TestHealth(t *testing.T) {
	cfg, err := Parse("t.toml", []byte(`
[[uplink]]
name = "isp-b"
mark = 100
interface = "eth1"
[uplink.health]
targets = ["192.0.2.53", "2001:db8::53", "tcp:192.0.2.80:443", "tcp:[2001:db8::80]:443"]
interval = "500ms"
timeout = "200ms"
down_after = 2
up_after = 1
`))
	if err != nil {
		t.Fatal(err)
	}
	h := cfg.Uplinks[0].Health
	if h == nil || len(h.Targets) != 4 || !h.Targets[2].TCP || h.Targets[3].Addr.String() != "[2001:db8::80]:443" ||
		h.Interval != 500*time.Millisecond || h.DownAfter != 2 || h.UpAfter != 1 {
		t.Fatalf("health %+v", h)
	}
	for _, c := range []struct{ body, want string }{
		{`targets = ["example.org"]`, `t.toml:6:1: target "example.org" is not an address`},
		{`targets = ["tcp:192.0.2.80"]`, `want tcp:ADDRESS:PORT`},
		{"targets = [\"192.0.2.1\"]\ninterval = \"50ms\"", `t.toml:7:1: interval must be a duration between 100ms and 1h`},
		{"targets = [\"192.0.2.1\"]\ndown_after = 0", `down_after`},
		{`interval = "1s"`, `[uplink.health] needs targets`},
	} {
		_, err := Parse("t.toml", []byte("\n[[uplink]]\nname = \"isp-b\"\nmark = 100\n[uplink.health]\n"+c.body+"\n"))
		if err == nil || !strings.Contains(err.Error(), "needs its interface") {
			t.Errorf("%s: %v, want the interface required", c.body, err)
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: %v, want %q", c.body, err, c.want)
		}
	}
}

func TestOnFailure(t *testing.T) {
	cfg, err := Parse("t.toml", []byte("[daemon]\non_failure = \"closed\"\n"))
	if err != nil || !cfg.Daemon.FailClosed {
		t.Fatalf("closed: %v %+v", err, cfg)
	}
	if _, err := Parse("t.toml", []byte("[daemon]\non_failure = \"shut\"\n")); err == nil || !strings.Contains(err.Error(), `t.toml:2:1: on_failure must be "open"`) {
		t.Errorf("bad value: %v", err)
	}
}
