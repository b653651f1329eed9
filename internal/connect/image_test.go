package connect

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy"
)

// fakeOwner is a connection's process and cgroup, for policy.Flow.
type fakeOwner struct {
	comm, exe, cg string
}

func (o fakeOwner) Process() (owner.Process, bool) {
	return owner.Process{PID: 1, Comm: o.comm, Exe: o.exe}, true
}
func (o fakeOwner) Cgroup() (string, bool) { return o.cg, true }

// The equivalence corpus: random policies and connections, decided by the
// daemon's engine (policy.Config.Decide, then the rule's uplinks as the
// daemon picks them) and by the compiled image, as the kernel program
// evaluates it. They must agree: on the rule, and on the uplink or the
// refusal. Where the image stops (a key only the daemon can test), every
// rule before the stop must be one the daemon does not match either.
func TestImageAgreesWithPolicy(t *testing.T) {
	root := t.TempDir() // a cgroup tree: ids are inode numbers, as in cgroup2
	cgs := []string{"system.slice", "system.slice/web.service", "system.slice/db.service", "user.slice", "user.slice/user-1000.slice"}
	ino := map[string]uint64{"": inodeOf(t, root)}
	for _, c := range cgs {
		if err := os.MkdirAll(filepath.Join(root, c), 0o755); err != nil {
			t.Fatal(err)
		}
		ino[c] = inodeOf(t, filepath.Join(root, c))
	}
	rng := rand.New(rand.NewPCG(7, 11))
	pick := func(xs []string) string { return xs[rng.IntN(len(xs))] }
	comms := corpusComms
	const policies, conns = 300, 200
	agreed, stopped := 0, 0
	for pi := 0; pi < policies; pi++ {
		b := genPolicy(rng, cgs)
		cfg, err := policy.Parse("corpus.toml", []byte(b.String()))
		if err != nil {
			t.Fatalf("policy %d: %v\n%s", pi, err, b.String())
		}
		im, err := Compile(cfg, root)
		if err != nil {
			t.Fatal(err)
		}
		upState := [3][2]bool{}
		for i := range upState {
			upState[i] = [2]bool{rng.IntN(4) != 0, rng.IntN(4) != 0}
		}
		up := func(u int, v6 bool) bool { return upState[u][map[bool]int{false: 0, true: 1}[v6]] }
		for ci := 0; ci < conns; ci++ {
			dst := netip.AddrPortFrom(netip.MustParseAddr(pick(corpusAddrs)), uint16([]int{53, 54, 80, 81, 443, 1 + rng.IntN(9500)}[rng.IntN(6)]))
			proto := []ipproto.Proto{ipproto.TCP, ipproto.UDP}[rng.IntN(2)]
			uid, gid := uint32(rng.IntN(3)*1000), uint32(rng.IntN(3)*1000)
			cg := pick(append([]string{""}, cgs...))
			comm := pick(comms)
			o := fakeOwner{comm: comm, exe: "/usr/bin/" + comm, cg: cg}
			if rng.IntN(5) == 0 {
				o.exe = "/opt/other/bin/" + comm + "-real" // comm and exe name differ
			}
			var chain []uint64 // the cgroup and its ancestors, as the kernel gives them
			for p := cg; ; p = filepath.Dir(p) {
				if p == "." {
					p = ""
				}
				chain = append(chain, ino[p])
				if p == "" {
					break
				}
			}
			f := &policy.Flow{Proto: proto, Dst: dst, UID: uid, GID: gid, HasUID: true, Owner: o}
			want := -1
			var rule *policy.Rule
			if rule = cfg.Decide(f); rule != nil {
				for i, r := range cfg.Rules {
					if r == rule {
						want = i
					}
				}
			}
			v := im.Decide(Conn{Proto: proto, Dst: dst, UID: uid, GID: gid, Cgroups: chain, Comm: comm}, up)
			if v.Stop {
				stopped++
				if want != -1 && want < v.Rule {
					t.Fatalf("policy %d, %s %v uid %d cg %q comm %q: the image stopped at rule %d (%s), but the daemon matches rule %d before it\n%s",
						pi, proto, dst, uid, cg, comm, v.Rule, v.Why, want, b.String())
				}
				continue
			}
			if v.Rule != want {
				t.Fatalf("policy %d, %s %v uid %d gid %d cg %q comm %q: the image decides by rule %d, the daemon by rule %d\n%s",
					pi, proto, dst, uid, gid, cg, comm, v.Rule, want, b.String())
			}
			if rule != nil {
				wantUp, wantRefuse, cands := daemonUplink(cfg, rule, dst.Addr().Is6(), up)
				switch {
				case v.Refuse != wantRefuse:
					t.Fatalf("policy %d, %v: refuse %v, the daemon %v\n%s", pi, dst, v.Refuse, wantRefuse, b.String())
				case v.Balanced && fmt.Sprint(v.Candidates) != fmt.Sprint(cands):
					t.Fatalf("policy %d, %v: balances over %v, the daemon over %v\n%s", pi, dst, v.Candidates, cands, b.String())
				case !v.Balanced && v.Uplink != wantUp:
					t.Fatalf("policy %d, %v: uplink %d, the daemon %d\n%s", pi, dst, v.Uplink, wantUp, b.String())
				}
			}
			agreed++
		}
	}
	t.Logf("%d connections decided alike, %d left to the daemon by the image (a stop)", agreed, stopped)
	if agreed < policies*conns/2 {
		t.Errorf("only %d of %d connections were decided in the kernel: the corpus tests too little", agreed, policies*conns)
	}
}

var (
	corpusDsts    = []string{"192.0.2.0/24", "192.0.2.128/25", "198.51.100.7/32", "203.0.113.0/24", "2001:db8::/32", "2001:db8:80::/48", "0.0.0.0/0", "::/0"}
	corpusUplinks = []string{"isp-a", "isp-b", "isp-c"}
	corpusComms   = []string{"curl", "ssh", "nginx", "wget"}
	corpusAddrs   = []string{"192.0.2.80", "192.0.2.200", "198.51.100.7", "203.0.113.9", "10.1.2.3", "2001:db8::1", "2001:db8:80::80", "2001:db9::1"}
)

// genPolicy writes a random policy of the corpus: three uplinks, up to six
// rules over every key and action.
func genPolicy(rng *rand.Rand, cgs []string) *strings.Builder {
	pick := func(xs []string) string { return xs[rng.IntN(len(xs))] }
	dsts, uplinks, comms := corpusDsts, corpusUplinks, corpusComms
	var b strings.Builder
	for i, u := range uplinks {
		fmt.Fprintf(&b, "[[uplink]]\nname = %q\nmark = %d\n\n", u, 100+i)
	}
	nrules := 1 + rng.IntN(6)
	for ri := 0; ri < nrules; ri++ {
		fmt.Fprintf(&b, "[[rule]]\nname = \"r%d\"\n", ri)
		if rng.IntN(2) == 0 {
			fmt.Fprintf(&b, "protocol = %q\n", pick([]string{"tcp", "udp"}))
		}
		if rng.IntN(2) == 0 {
			fmt.Fprintf(&b, "dst = [%q, %q]\n", pick(dsts), pick(dsts))
		}
		if rng.IntN(4) == 0 {
			fmt.Fprintf(&b, "not_dst = [%q]\n", pick(dsts))
		}
		if rng.IntN(2) == 0 {
			lo := 1 + rng.IntN(9000)
			fmt.Fprintf(&b, "dport = [%d, \"%d-%d\"]\n", 53+rng.IntN(3), lo, lo+rng.IntN(500))
		}
		if rng.IntN(4) == 0 {
			fmt.Fprintf(&b, "not_dport = [%d]\n", 80+rng.IntN(3))
		}
		if rng.IntN(3) == 0 {
			fmt.Fprintf(&b, "uid = [%d, %d]\n", rng.IntN(3)*1000, 33)
		}
		if rng.IntN(5) == 0 {
			fmt.Fprintf(&b, "not_gid = [%d]\n", rng.IntN(3)*1000)
		}
		if rng.IntN(4) == 0 {
			fmt.Fprintf(&b, "cgroup = [%q]\n", pick(cgs))
		}
		if rng.IntN(5) == 0 {
			fmt.Fprintf(&b, "process = [%q]\n", pick(comms))
		}
		if rng.IntN(8) == 0 {
			b.WriteString("exe = [\"/usr/bin/curl\"]\n")
		}
		switch rng.IntN(5) {
		case 0:
			b.WriteString("uplink = \"default\"\n")
		case 1:
			i := rng.IntN(3)
			fmt.Fprintf(&b, "uplink = [%q, %q]\non_down = \"drop\"\n", uplinks[i], uplinks[(i+1+rng.IntN(2))%3])
		case 2:
			fmt.Fprintf(&b, "uplink = [%q, \"default\"]\n", pick(uplinks))
		case 3:
			fmt.Fprintf(&b, "balance = { %q = %d, %q = %d }\n", uplinks[0], 1+rng.IntN(3), uplinks[1], 1+rng.IntN(3))
		default:
			fmt.Fprintf(&b, "uplink = %q\n", pick(uplinks))
		}
		b.WriteString("\n")
	}
	return &b
}

// daemonUplink is the uplink the daemon's engine takes for a matched rule
// (daemon.worker.decide): -1 for the host's routing; refuse for on_down =
// "drop" with every uplink down; for a balance, the uplinks it picks from.
func daemonUplink(cfg *policy.Config, r *policy.Rule, v6 bool, up Up) (int, bool, []int) {
	index := func(u *policy.Uplink) int {
		for i, x := range cfg.Uplinks {
			if x == u {
				return i
			}
		}
		return -1
	}
	a := r.Action
	switch a.Kind {
	case policy.ActDefault:
		return -1, false, nil
	case policy.ActBalance:
		var cands []int
		for _, c := range a.Choices {
			if c.Uplink != nil && up(index(c.Uplink), v6) {
				cands = append(cands, index(c.Uplink))
			}
		}
		if len(cands) > 0 {
			return cands[0], false, cands
		}
		return -1, a.DropWhenDown, nil
	}
	for _, c := range a.Choices {
		if c.Uplink == nil {
			return -1, false, nil
		}
		if up(index(c.Uplink), v6) {
			return index(c.Uplink), false, nil
		}
	}
	return -1, a.DropWhenDown, nil
}

func inodeOf(t *testing.T, p string) uint64 {
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}
