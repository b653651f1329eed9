package policy

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/owner"
)

// fakeOwner counts lookups, to prove they happen only when needed.
type fakeOwner struct {
	proc        owner.Process
	hasProc     bool
	cg          string
	hasCg       bool
	procCalls   int
	cgroupCalls int
}

func (o *fakeOwner) Process() (owner.Process, bool) { o.procCalls++; return o.proc, o.hasProc }
func (o *fakeOwner) Cgroup() (string, bool)         { o.cgroupCalls++; return o.cg, o.hasCg }

const appPolicy = `
[[uplink]]
name = "isp-b"
mark = 100

[[rule]]
name = "mirror pinned"
uplink = "default"
cgroup = "system.slice/mirror.service"

[[rule]]
name = "crawler"
uplink = "isp-b"
process = ["crawler", "wget"]
not_dst = ["192.0.2.0/25"]

[[rule]]
name = "backup tool"
mark = 200
exe = "/usr/local/bin/restic"
dport = [22]

[[rule]]
name = "web, not root"
uplink = "isp-b"
dport = 80
not_uid = 0
`

func TestProcessCgroupNegationActions(t *testing.T) {
	cfg, err := Parse("app.toml", []byte(appPolicy))
	if err != nil {
		t.Fatal(err)
	}
	flow := func(dst string, uid uint32, o *fakeOwner) *Flow {
		f := &Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort(dst), UID: uid, HasUID: true}
		if o != nil {
			f.Owner = o
		}
		return f
	}
	crawler := &fakeOwner{proc: owner.Process{PID: 7, Comm: "crawler", Exe: "/opt/c/crawler"}, hasProc: true, cg: "user.slice/u-1000.slice", hasCg: true}
	restic := &fakeOwner{proc: owner.Process{PID: 8, Comm: "restic", Exe: "/usr/local/bin/restic"}, hasProc: true, cg: "system.slice/backup.service", hasCg: true}
	mirror := &fakeOwner{proc: owner.Process{PID: 9, Comm: "rsync", Exe: "/usr/bin/rsync"}, hasProc: true, cg: "system.slice/mirror.service/sub", hasCg: true}
	lookalike := &fakeOwner{proc: owner.Process{PID: 10, Comm: "rsync", Exe: "/usr/bin/rsync"}, hasProc: true, cg: "system.slice/mirror.service2", hasCg: true}
	wgetByExe := &fakeOwner{proc: owner.Process{PID: 11, Comm: "wget-worker", Exe: "/usr/bin/wget"}, hasProc: true, hasCg: true}
	cases := []struct {
		name   string
		f      *Flow
		rule   string
		action ActionKind
	}{
		{"cgroup subtree pinned to default", flow("192.0.2.200:80", 1000, mirror), "mirror pinned", ActDefault},
		{"cgroup prefix is whole components", flow("192.0.2.200:443", 1000, lookalike), "", 0},
		{"process by comm", flow("192.0.2.200:443", 1000, crawler), "crawler", ActUplink},
		{"process by exe base name", flow("192.0.2.200:443", 1000, wgetByExe), "crawler", ActUplink},
		{"not_dst excludes", flow("192.0.2.10:443", 1000, crawler), "", 0},
		{"exe and dport", flow("198.51.100.9:22", 0, restic), "backup tool", ActMark},
		{"exe, wrong port", flow("198.51.100.9:23", 0, restic), "", 0},
		{"not_uid", flow("192.0.2.200:80", 0, nil), "", 0},
		{"not_uid, other user, no process", flow("192.0.2.200:80", 1000, nil), "web, not root", ActUplink},
	}
	for _, c := range cases {
		got := cfg.Decide(c.f)
		name := ""
		if got != nil {
			name = got.Name
		}
		if name != c.rule || (got != nil && got.Action.Kind != c.action) {
			t.Errorf("%s: decided %q, want %q", c.name, name, c.rule)
		}
	}
	if a := cfg.Rules[2].Action; a.Kind != ActMark || a.Mark != 200 {
		t.Errorf("mark action = %+v", a)
	}
}

// Process keys never match a flow without a process, negated or not.
func TestNoProcessNeverMatchesProcessKeys(t *testing.T) {
	cfg, err := Parse("n.toml", []byte("[[uplink]]\nname = \"b\"\nmark = 1\n[[rule]]\nuplink = \"b\"\nnot_process = \"curl\"\n"))
	if err != nil {
		t.Fatal(err)
	}
	f := &Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort("192.0.2.1:80"), HasUID: true, Owner: &fakeOwner{}}
	if r := cfg.Decide(f); r != nil {
		t.Fatalf("not_process matched a flow with no process: %s", r.Name)
	}
	if why := cfg.Rules[0].Explain(f); why != "not_process: the connection has no owning process" {
		t.Fatalf("Explain = %q", why)
	}
}

// The process is looked up only for a rule whose cheaper keys all match.
func TestOwnerLookedUpLazily(t *testing.T) {
	cfg, err := Parse("app.toml", []byte(appPolicy))
	if err != nil {
		t.Fatal(err)
	}
	// Rule 3 (exe) needs port 22: no process lookup for port 443 there.
	// Rule 1 (cgroup) and 2 (process) have no cheap key that fails, so they
	// do look: once each.
	o := &fakeOwner{hasProc: true, proc: owner.Process{Comm: "x", Exe: "/x"}, hasCg: true, cg: "a"}
	cfg.Decide(&Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort("192.0.2.200:443"), HasUID: true, Owner: o})
	if o.procCalls != 1 || o.cgroupCalls != 1 {
		t.Fatalf("process looked up %d times, cgroup %d times; want 1 and 1", o.procCalls, o.cgroupCalls)
	}
	o = &fakeOwner{}
	cfg.Rules = cfg.Rules[2:] // only rules without a cheap match for port 443 on 192.0.2.10 remain
	cfg.Decide(&Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort("192.0.2.10:443"), HasUID: true, Owner: o})
	if o.procCalls != 0 {
		t.Fatalf("process looked up %d times although no rule's cheap keys matched", o.procCalls)
	}
}

func TestExplain(t *testing.T) {
	cfg, err := Parse("app.toml", []byte(appPolicy))
	if err != nil {
		t.Fatal(err)
	}
	o := &fakeOwner{proc: owner.Process{PID: 42, Comm: "curl", Exe: "/usr/bin/curl"}, hasProc: true, cg: "user.slice", hasCg: true}
	f := &Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort("192.0.2.200:22"), UID: 1000, HasUID: true, Owner: o}
	want := []string{
		`cgroup: cgroup "user.slice" is not in [system.slice/mirror.service]`,
		`process: process "curl" (exe /usr/bin/curl, pid 42) is not in [crawler, wget]`,
		`exe: exe /usr/bin/curl is not in [/usr/local/bin/restic]`,
		`dport: 22 is not in [80]`,
	}
	for i, r := range cfg.Rules {
		if got := r.Explain(f); !strings.HasPrefix(got, want[i]) {
			t.Errorf("rule %q: Explain = %q, want %q", r.Name, got, want[i])
		}
	}
}

// The parser gives uid and gid conditions their keys: an explanation names
// the key and the flow's id (match's tests cover how ids are named).
func TestExplainUIDAndGID(t *testing.T) {
	cfg, err := Parse("ids.toml", []byte(`
[[uplink]]
name = "isp-b"
mark = 100

[[rule]]
name = "backups"
uplink = "isp-b"
uid = [0]

[[rule]]
name = "staff"
uplink = "isp-b"
not_gid = [4321]
`))
	if err != nil {
		t.Fatal(err)
	}
	f := &Flow{Proto: ipproto.TCP, Dst: netip.MustParseAddrPort("192.0.2.80:80"), UID: 4321, GID: 4321, HasUID: true, Owner: &fakeOwner{}}
	for i, want := range []string{"uid: uid 4321", "not_gid: gid 4321"} {
		if got := cfg.Rules[i].Explain(f); !strings.HasPrefix(got, want) || !strings.HasSuffix(got, []string{" is not in [0]", " is in [4321]"}[i]) {
			t.Errorf("rule %q: Explain = %q, want %q…", cfg.Rules[i].Name, got, want)
		}
	}
}
