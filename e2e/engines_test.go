package e2e

import (
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"github.com/rerouted/rerouted/internal/networld/worldtest"
)

// enginesRules exercise every key and action both engines decide, in an
// order where first-match matters; %[1]s is the test's cgroup, %[2]s a
// client program's path (an exe rule, which only the daemon can test).
const enginesRules = `
[[rule]]
name = "exempt uid 4321"
uid = [4321]
dport = [8081]
uplink = "default"

[[rule]]
name = "by process"
process = ["agreeclient"]
dport = [8081]
uplink = "isp-b"

[[rule]]
name = "by cgroup"
cgroup = [%[1]q]
dport = [8086]
uplink = "isp-b"

[[rule]]
name = "v6 web"
dst = ["2001:db8:80::/48"]
protocol = "tcp"
dport = [8080]
uplink = "isp-b"

[[rule]]
name = "web"
dst = ["192.0.2.0/24"]
dport = ["8080-8082"]
not_dport = [8081]
uplink = ["isp-b", "default"]

[[rule]]
name = "dns"
protocol = "udp"
dport = [5353]
uplink = "isp-b"

[[rule]]
name = "by exe"
exe = [%[2]q]
dport = [8083]
uplink = "isp-b"

[[rule]]
name = "after exe"
dport = [8083, 8084]
uplink = "default"

[[rule]]
name = "only isp-b"
dport = [8085]
uplink = "isp-b"
on_down = "drop"
`

// Both engines give the same verdicts: the same policy, the same
// connections (by root, by another uid, by a named program, from a
// cgroup; TCP and UDP; IPv4 and IPv6), judged by what the server saw or by
// the refusal, with ISP B up and then down.
func TestEnginesAgree(t *testing.T) {
	worldtest.Require(t) // before the cgroup and the programs
	pub := publicDir(t)
	agree := program(t, filepath.Join(pub, "bin"), "agreeclient")
	other := program(t, filepath.Join(pub, "bin"), "otherclient")
	cg, cgfd := testCgroup(t)
	rules := fmt.Sprintf(enginesRules, cg, other)
	verdicts := map[string]map[string]string{}
	for _, steering := range []string{"queue", "connect"} {
		t.Run(steering, func(t *testing.T) {
			e := newEnv(t, "kernel", rules)
			cfg := e.headWith(steering, "")
			e.writeRaw(cfg + rules)
			for _, port := range []uint16{8081, 8082, 8083, 8084, 8085, 8086} {
				if _, err := e.w.Serve(port); err != nil {
					t.Fatal(err)
				}
			}
			for _, port := range []uint16{53, 5353} {
				if _, err := e.w.ServeUDP(port); err != nil {
					t.Fatal(err)
				}
			}
			e.start()
			got := map[string]string{}
			verdicts[steering] = got
			// run runs a client program and says what the server saw.
			run := func(prog string, dst netip.AddrPort, uid, cgroupFD int) string {
				args := []string{"--net=/run/netns/" + e.w.Host.Name}
				if uid != 0 {
					args = append(args, "--setuid", strconv.Itoa(uid), "--setgid", strconv.Itoa(uid))
				}
				args = append(args, "--", prog, "-connect", dst.String(), "-timeout", "2s")
				cmd := exec.Command("nsenter", args...)
				if cgroupFD != 0 {
					cmd.SysProcAttr = &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: cgroupFD}
				}
				out, _ := cmd.CombinedOutput()
				return verdict(string(out))
			}
			tcp := func(name string, dst netip.Addr, port uint16) {
				c, err := e.w.Dial(networld.DialOptions{Dst: dst, Port: port, Timeout: 2 * time.Second})
				if err != nil {
					got[name] = verdict("error: " + err.Error())
					return
				}
				peer, _, err := networld.Exchange(c, 0)
				c.Close()
				if err != nil {
					got[name] = verdict("error: " + err.Error())
					return
				}
				got[name] = verdict("peer=" + peer.String())
			}
			udp := func(name string, port uint16) {
				dst := netip.AddrPortFrom(networld.ServerAddr, port)
				s, err := e.w.UDPSocket(dst, true, netip.AddrPort{})
				if err != nil {
					t.Fatal(err)
				}
				defer s.Close()
				peer, err := networld.AskUDP(s, dst, "q", 2*time.Second)
				if err != nil {
					got[name] = verdict("error: " + err.Error())
					return
				}
				got[name] = verdict("peer=" + peer.String())
			}
			sv := func(port uint16) netip.AddrPort { return netip.AddrPortFrom(networld.ServerAddr, port) }
			all := func(phase string) {
				tcp(phase+" root :80", networld.ServerAddr, 80)
				tcp(phase+" root :8080", networld.ServerAddr, 8080)
				tcp(phase+" root :8080 IPv6", networld.Server6, 8080)
				tcp(phase+" root :8081", networld.ServerAddr, 8081)
				tcp(phase+" root :8082", networld.ServerAddr, 8082)
				tcp(phase+" root :8084", networld.ServerAddr, 8084)
				tcp(phase+" root :8085", networld.ServerAddr, 8085)
				udp(phase+" root udp :5353", 5353)
				udp(phase+" root udp :53", 53)
				got[phase+" agreeclient :8081"] = run(agree, sv(8081), 0, 0)
				got[phase+" agreeclient uid 4321 :8081"] = run(agree, sv(8081), 4321, 0)
				got[phase+" otherclient :8083"] = run(other, sv(8083), 0, 0)
				got[phase+" agreeclient :8083"] = run(agree, sv(8083), 0, 0)
				got[phase+" agreeclient in the cgroup :8086"] = run(agree, sv(8086), 0, cgfd)
				got[phase+" agreeclient elsewhere :8086"] = run(agree, sv(8086), 0, 0)
			}
			all("up:")
			e.linkB(false)
			e.waitISPB(false, 3*time.Second)
			all("down:")
			e.linkB(true)
		})
	}
	want := map[string]string{
		"root :80": "A", "root :8080": "B", "root :8080 IPv6": "B", "root :8081": "A", "root :8082": "B",
		"root :8084": "A", "root :8085": "B", "root udp :5353": "B", "root udp :53": "A",
		"agreeclient :8081": "B", "agreeclient uid 4321 :8081": "A", "otherclient :8083": "B", "agreeclient :8083": "A",
		"agreeclient in the cgroup :8086": "B", "agreeclient elsewhere :8086": "A",
	}
	for name, w := range want {
		for _, phase := range []string{"up:", "down:"} {
			expect := w
			if phase == "down:" && w == "B" {
				expect = "A" // the rule's uplink is down: the host's routing
				if name == "root :8085" {
					expect = "refused" // on_down = "drop"
				}
			}
			q, c := verdicts["queue"][phase+" "+name], verdicts["connect"][phase+" "+name]
			if q != expect || c != expect {
				t.Errorf("%s %s: the queue engine %s, the connect engine %s; want %s", phase, name, q, c, expect)
			}
		}
	}
}

// verdict reduces a client's outcome to the uplink the server saw it
// through, or how it failed.
func verdict(out string) string {
	switch {
	case strings.Contains(out, "peer="+networld.HostB.String()), strings.Contains(out, "peer=["+networld.HostB6.String()):
		return "B"
	case strings.Contains(out, "peer="+networld.HostA.String()), strings.Contains(out, "peer=["+networld.HostA6.String()):
		return "A"
	case strings.Contains(out, "operation not permitted"), strings.Contains(out, "connection reset"), strings.Contains(out, "connection abort"), strings.Contains(out, "connection refused"):
		return "refused"
	}
	return "unreachable"
}
