package policy

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/ipproto"
)

const good = `# two uplinks, one rule
[daemon]
queue = 3
honor_marks = false
control_socket = "/run/x.sock"
gc_interval = "500ms"

[[uplink]]
name = "isp-a"
mark = 200

[[uplink]]
name = "isp-b"
mark = 100
interface = "hb"

[[rule]]
name = "web via isp-b"
uplink = "isp-b"
dport = [80, "8000-8100"]
dst = ["192.0.2.0/24", "2001:db8::/32", "198.51.100.7"]
uid = 1001
protocol = "tcp"

[[rule]]
uplink = "isp-a"
dport = [
  22,
  "2222-2223",
]
`

func TestParseGood(t *testing.T) {
	cfg, err := Parse("good.toml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	d := cfg.Daemon
	if d.Queue != 3 || d.HonorMarks || d.ControlSocket != "/run/x.sock" || d.GCInterval != 500*time.Millisecond {
		t.Fatalf("daemon = %+v", d)
	}
	if len(cfg.Uplinks) != 2 || cfg.Uplinks[1].Mark != 100 || cfg.Uplinks[1].Interface != "hb" {
		t.Fatalf("uplinks = %+v", cfg.Uplinks)
	}
	r := cfg.Rules[0]
	if r.Action.Uplink != cfg.Uplinks[1] || r.Action.Kind != ActUplink || r.Action.Mark != 100 || len(r.conds) != 4 {
		t.Fatalf("rule 0 = %+v", r)
	}
	if r.Line() != 17 {
		t.Errorf("rule 0 line = %d, want 17", r.Line())
	}
	if got := cfg.Rules[1].Name; got != "rule@25" {
		t.Errorf("unnamed rule is called %q, want rule@25", got)
	}
}

func TestDefaults(t *testing.T) {
	cfg, err := Parse("d.toml", []byte("[[uplink]]\nname = \"b\"\nmark = 1\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Daemon.Datapath != "kernel" || cfg.Daemon.Queues < 1 {
		t.Fatalf("datapath defaults = %q, %d queues", cfg.Daemon.Datapath, cfg.Daemon.Queues)
	}
	if cfg.Daemon.IdleTimeout != 120*time.Second {
		t.Fatalf("idle_timeout default = %v, want 120s", cfg.Daemon.IdleTimeout)
	}
	cfg, err = Parse("d.toml", []byte("[daemon]\ndatapath = \"userspace\"\nqueues = 3\nidle_timeout = \"30s\"\n"))
	if err == nil && cfg.Daemon.IdleTimeout != 30*time.Second {
		t.Fatalf("idle_timeout = %v, want 30s", cfg.Daemon.IdleTimeout)
	}
	if err != nil || cfg.Daemon.Datapath != "userspace" || cfg.Daemon.Queues != 3 {
		t.Fatalf("datapath settings = %+v, %v", cfg.Daemon, err)
	}
	cfg, err = Parse("d.toml", []byte("[[uplink]]\nname = \"b\"\nmark = 1\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Daemon.HonorMarks || cfg.Daemon.ControlSocket != DefaultControlSocket || cfg.Daemon.GCInterval != DefaultGCInterval {
		t.Fatalf("defaults = %+v", cfg.Daemon)
	}
}

// Each bad file must be rejected with the exact place of the mistake.
func TestParseErrors(t *testing.T) {
	const up = "[[uplink]]\nname = \"b\"\nmark = 100\n"
	cases := []struct{ name, src, want string }{
		{"syntax", "[daemon]\nqueue = = 1\n", "bad.toml:2:9: "},
		{"unterminated header", "[daemon\n", "bad.toml:1:8: "},
		{"unknown top key", "colour = 1\n", "bad.toml:1:1: unknown key \"colour\""},
		{"unknown daemon key", "[daemon]\n  qeueu = 1\n", "bad.toml:2:3: unknown key \"qeueu\" in [daemon]"},
		{"unknown rule key", up + "[[rule]]\nuplink = \"b\"\n\n[[rule]]\nuplink = \"b\"\ndprot = 80\n", "bad.toml:9:1: unknown key \"dprot\" in [[rule]]"},
		{"unknown uplink name", up + "[[rule]]\nuplink = \"c\"\n", "bad.toml:5:1: unknown uplink \"c\" (defined: \"b\", or \"default\")"},
		{"bad cidr", up + "[[rule]]\nuplink = \"b\"\ndst = [\"192.0.2.0/33\"]\n", "bad.toml:6:1: bad CIDR \"192.0.2.0/33\""},
		{"host bits", up + "[[rule]]\nuplink = \"b\"\ndst = \"192.0.2.1/24\"\n", "bad.toml:6:1: dst \"192.0.2.1/24\" has host bits set"},
		{"port zero", up + "[[rule]]\nuplink = \"b\"\ndport = 0\n", "bad.toml:6:1: port 0 is outside 1-65535"},
		{"port too big", up + "[[rule]]\nuplink = \"b\"\ndport = [80, 70000]\n", "bad.toml:6:1: port 70000 is outside 1-65535"},
		{"range too big", up + "[[rule]]\nuplink = \"b\"\ndport = \"1-65536\"\n", "bad.toml:6:1: port range \"1-65536\" is outside 1-65535"},
		{"reversed range", up + "[[rule]]\nuplink = \"b\"\ndport = \"90-80\"\n", "bad.toml:6:1: port range \"90-80\" is reversed"},
		{"mark missing", "[[uplink]]\nname = \"b\"\n", "bad.toml:1:1: [[uplink]] needs a mark"},
		{"mark range", "[[uplink]]\nname = \"b\"\nmark = -1\n", "bad.toml:3:1: mark -1 is out of range"},
		{"duplicate uplink", up + up, "bad.toml:5:1: uplink \"b\" is defined twice"},
		{"rule without action", up + "[[rule]]\ndport = 80\n", "bad.toml:4:1: [[rule]] needs an action"},
		{"uplink and mark", up + "[[rule]]\nuplink = \"b\"\nmark = 5\n", "bad.toml:6:1: a rule takes uplink or mark, not both"},
		{"unknown group", up + "[[rule]]\nuplink = \"b\"\ngroup = \"no-such-group-xyz\"\n", "bad.toml:6:1: unknown group"},
		{"relative exe", up + "[[rule]]\nuplink = \"b\"\nexe = \"bin/curl\"\n", "bad.toml:6:1: exe \"bin/curl\" must be an absolute path"},
		{"process path", up + "[[rule]]\nuplink = \"b\"\nprocess = \"/usr/bin/curl\"\n", "bad.toml:6:1: process \"/usr/bin/curl\" must be a program name"},
		{"bad cgroup", up + "[[rule]]\nuplink = \"b\"\ncgroup = \"a/../b\"\n", "bad.toml:6:1: cgroup \"a/../b\" is not a clean path"},
		{"bad negation", up + "[[rule]]\nuplink = \"b\"\nnot_protocol = \"tcp\"\n", "bad.toml:6:1: unknown key \"not_protocol\""},
		{"reserved uplink name", "[[uplink]]\nname = \"default\"\nmark = 1\n", "bad.toml:2:1: \"default\" is reserved"},
		{"unknown user", up + "[[rule]]\nuplink = \"b\"\nuser = \"no-such-user-xyz\"\n", "bad.toml:6:1: unknown user \"no-such-user-xyz\""},
		{"protocol", up + "[[rule]]\nuplink = \"b\"\nprotocol = \"sctp\"\n", "bad.toml:6:1: protocol \"sctp\" is not supported"},
		{"queue range", "[daemon]\nqueue = 70000\n", "bad.toml:2:1: queue 70000 is out of range"},
		{"relative socket", "[daemon]\ncontrol_socket = \"x.sock\"\n", "bad.toml:2:1: control_socket must be an absolute path"},
		{"type", "[daemon]\nhonor_marks = \"yes\"\n", "bad.toml:2:1: honor_marks must be true or false"},
		{"datapath", "[daemon]\ndatapath = \"ebpf\"\n", "bad.toml:2:1: datapath must be \"kernel\" or \"userspace\""},
		{"queues", "[daemon]\nqueues = 0\n", "bad.toml:2:1: queues 0 is out of range 1-64"},
		{"gateway without table", "[[uplink]]\nname = \"b\"\nmark = 1\ninterface = \"hb\"\ngateway = \"203.0.113.1\"\n", "bad.toml:1:1: a managed [[uplink]] needs a table"},
		{"table without gateway", "[[uplink]]\nname = \"b\"\nmark = 1\ninterface = \"hb\"\ntable = 100\n", "bad.toml:1:1: a managed [[uplink]] needs gateway or gateway6"},
		{"managed without interface", "[[uplink]]\nname = \"b\"\nmark = 1\ntable = 100\ngateway = \"203.0.113.1\"\n", "bad.toml:1:1: a managed [[uplink]] needs its interface"},
		{"gateway family", "[[uplink]]\nname = \"b\"\nmark = 1\ninterface = \"hb\"\ntable = 100\ngateway = \"2001:db8::1\"\n", "bad.toml:6:1: gateway must be an IPv4 address"},
		{"main table", "[[uplink]]\nname = \"b\"\nmark = 1\ninterface = \"hb\"\ntable = 254\ngateway = \"203.0.113.1\"\n", "bad.toml:5:1: table 254 is the kernel's own"},
		{"idle timeout", "[daemon]\nidle_timeout = \"10ms\"\n", "bad.toml:2:1: idle_timeout must be a duration between 1s and 24h"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Parse("bad.toml", []byte(c.src))
			var es Errors
			if !errors.As(err, &es) {
				t.Fatalf("err = %v (%T), want Errors", err, err)
			}
			if !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got\n%s\nwant it to contain\n%s", err, c.want)
			}
		})
	}
}

func TestAllErrorsReportedInFileOrder(t *testing.T) {
	src := "[daemon]\nqueue = -1\n[[uplink]]\nname = \"b\"\nmark = 1\n[[rule]]\nuplink = \"x\"\ndport = 0\n"
	_, err := Parse("f.toml", []byte(src))
	lines := strings.Split(err.Error(), "\n")
	if len(lines) != 3 || !strings.HasPrefix(lines[0], "f.toml:2:") || !strings.HasPrefix(lines[1], "f.toml:7:") || !strings.HasPrefix(lines[2], "f.toml:8:") {
		t.Fatalf("errors = %q", lines)
	}
}

func TestDecide(t *testing.T) {
	cfg, err := Parse("good.toml", []byte(good))
	if err != nil {
		t.Fatal(err)
	}
	flow := func(dst string, uid uint32, hasUID bool) *Flow {
		return &Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort(dst), UID: uid, HasUID: hasUID}
	}
	cases := []struct {
		f    *Flow
		want string
	}{
		{flow("192.0.2.80:80", 1001, true), "web via isp-b"},
		{flow("192.0.2.80:8050", 1001, true), "web via isp-b"},
		{flow("192.0.2.80:80", 1002, true), ""},  // wrong uid
		{flow("192.0.2.80:80", 1001, false), ""}, // no socket: uid keys cannot match
		{flow("203.0.113.9:80", 1001, true), ""}, // wrong dst
		{flow("[2001:db8::1]:80", 1001, true), "web via isp-b"},
		{flow("[::ffff:192.0.2.80]:80", 1001, true), "web via isp-b"},
		{flow("192.0.2.80:2223", 0, true), "rule@25"}, // second rule, multi-line list
		{flow("192.0.2.80:2224", 0, true), ""},
	}
	for _, c := range cases {
		got := ""
		if r := cfg.Decide(c.f); r != nil {
			got = r.Name
		}
		if got != c.want {
			t.Errorf("Decide(%v uid=%d/%v) = %q, want %q", c.f.Dst, c.f.UID, c.f.HasUID, got, c.want)
		}
	}
}

// protocol selects TCP, UDP or ICMP echo; an echo has no port, so dport
// never matches it (and not_dport always does).
func TestProtocols(t *testing.T) {
	cfg, err := Parse("p.toml", []byte(`[[uplink]]
name = "b"
mark = 1

[[rule]]
name = "dns"
uplink = "b"
protocol = "udp"
dport = 53

[[rule]]
name = "ping"
uplink = "b"
protocol = ["icmp"]

[[rule]]
name = "not-dport"
uplink = "b"
not_dport = 53
`))
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		proto     ipproto.Proto
		dst, want string
	}{
		{ipproto.UDP, "192.0.2.53:53", "dns"},
		{ipproto.TCP, "192.0.2.53:53", ""},
		{ipproto.ICMP, "192.0.2.53:53", "ping"},       // identifier 53: not a port
		{ipproto.ICMPv6, "[2001:db8::53]:53", "ping"}, // protocol = "icmp" is ICMPv6 too
		{ipproto.UDP, "192.0.2.53:54", "not-dport"},
	} {
		got := ""
		if r := cfg.Decide(&Flow{Proto: c.proto, Dst: netip.MustParseAddrPort(c.dst), HasUID: true}); r != nil {
			got = r.Name
		}
		if got != c.want {
			t.Errorf("%s to %s: rule %q, want %q", c.proto, c.dst, got, c.want)
		}
	}
	cfg2, _ := Parse("p.toml", []byte("[[uplink]]\nname = \"b\"\nmark = 1\n[[rule]]\nuplink = \"b\"\ndport = 53\n"))
	if r := cfg2.Decide(&Flow{Proto: ipproto.ICMP, Dst: netip.MustParseAddrPort("192.0.2.53:53"), HasUID: true}); r != nil {
		t.Errorf("dport 53 matched an echo with identifier 53")
	}
}

// The policy names an ICMPv6 echo "icmp", as the configuration does, in
// its explanations too; and a list of protocols reads as written.
func TestProtocolExplained(t *testing.T) {
	cfg, err := Parse("p.toml", []byte("[[uplink]]\nname = \"b\"\nmark = 1\n[[rule]]\nuplink = \"b\"\nprotocol = [\"tcp\", \"udp\"]\n"))
	if err != nil {
		t.Fatal(err)
	}
	f := &Flow{Proto: ipproto.ICMPv6, Dst: netip.MustParseAddrPort("[2001:db8::1]:7"), HasUID: true}
	if got, want := cfg.Rules[0].Explain(f), "protocol: icmp is not in [tcp, udp]"; got != want {
		t.Errorf("Explain = %q, want %q", got, want)
	}
	if _, err := Parse("p.toml", []byte("[[uplink]]\nname = \"b\"\nmark = 1\n[[rule]]\nuplink = \"b\"\nprotocol = \"icmpv6\"\n")); err == nil || !strings.Contains(err.Error(), `protocol "icmpv6" is not supported`) {
		t.Errorf("protocol = \"icmpv6\": %v, want not supported", err)
	}
}

// SteeringSet tells a written steering key from the default.
func TestSteeringSet(t *testing.T) {
	for src, want := range map[string]bool{
		"":                                   false,
		"[daemon]\nqueue = 3\n":              false,
		"[daemon]\nsteering = \"connect\"\n": true,
		"[daemon]\nsteering = \"queue\"\n":   true,
	} {
		cfg, err := Parse("t.toml", []byte(src))
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Daemon.SteeringSet != want || cfg.Daemon.Steering == "" {
			t.Errorf("%q: SteeringSet %v (steering %q), want %v", src, cfg.Daemon.SteeringSet, cfg.Daemon.Steering, want)
		}
	}
}
