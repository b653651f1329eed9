package connect

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/rerouted/rerouted/internal/ipproto"
	"github.com/rerouted/rerouted/internal/owner"
	"github.com/rerouted/rerouted/internal/policy"
	"github.com/rerouted/rerouted/internal/testenv"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The program loads (the verifier accepts it), attaches and detaches. The
// end-to-end tests judge what it does to real connections.
func TestLoad(t *testing.T) {
	testenv.NeedRoot(t, "to load and attach a cgroup program")
	root, err := owner.Cgroup2Mount("/proc/self/mountinfo")
	if err != nil || root == "" {
		testenv.Skip(t, "no cgroup v2 mount: %v", err)
	}
	// In a network namespace of its own: the program acts on that
	// namespace's sockets only, and the machine's own is left alone.
	done := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with its namespace
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			done <- err
			return
		}
		e, err := Open(root, "")
		if err != nil {
			done <- err
			return
		}
		err = e.Apply(&Image{Rules: []Rule{{Name: "r", Flags: fDport, Dports: nil}}})
		if err == nil {
			_, err = e.Stats()
		}
		done <- errors.Join(err, e.Detach())
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// The kernel program decides as the image says: the equivalence corpus's
// policies, loaded into the real program in a network namespace of the
// test's own, and connections made for real (non-blocking: connect()
// binds and routes, then returns); getsockname tells which uplink's
// address the program bound the socket to. Connections come from this
// process: its uid, its comm, its cgroup.
func TestKernelAgreesWithImage(t *testing.T) {
	testenv.NeedRoot(t, "to load and attach a cgroup program")
	root, err := owner.Cgroup2Mount("/proc/self/mountinfo")
	if err != nil || root == "" {
		testenv.Skip(t, "no cgroup v2 mount: %v", err)
	}
	done := make(chan error)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread dies with its namespace
		done <- kernelCorpus(t, root)
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func kernelCorpus(t *testing.T, root string) error {
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		return err
	}
	// Uplink addresses on one dummy link; the host's own source on
	// another, which has the default routes.
	upAddrs4 := []string{"198.51.100.2", "203.0.113.2", "192.0.2.2"}
	upAddrs6 := []string{"2001:db8:a::2", "2001:db8:b::2", "2001:db8:c::2"}
	h, err := netlink.NewHandle()
	if err != nil {
		return err
	}
	defer h.Close()
	lo, _ := h.LinkByName("lo")
	h.LinkSetUp(lo)
	for _, name := range []string{"uplinks0", "host0"} {
		if err := h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}); err != nil {
			return fmt.Errorf("veth %s: %w", name, err)
		}
		peer, err := h.LinkByName(name + "p")
		if err != nil {
			return err
		}
		if err := h.LinkSetUp(peer); err != nil {
			return err
		}
	}
	ul, _ := h.LinkByName("uplinks0")
	hl, _ := h.LinkByName("host0")
	for _, a := range append(append([]string{}, upAddrs4...), upAddrs6...) {
		bits := 32
		if strings.Contains(a, ":") {
			bits = 128
		}
		addr, _ := netlink.ParseAddr(fmt.Sprintf("%s/%d", a, bits))
		addr.Flags = unix.IFA_F_NODAD
		if err := h.AddrAdd(ul, addr); err != nil {
			return fmt.Errorf("address %s: %w", a, err)
		}
	}
	for _, a := range []string{"10.9.9.9/32", "2001:db8:ffff::9/128"} {
		addr, _ := netlink.ParseAddr(a)
		addr.Flags = unix.IFA_F_NODAD
		if err := h.AddrAdd(hl, addr); err != nil {
			return err
		}
	}
	for _, l := range []netlink.Link{ul, hl} {
		if err := h.LinkSetUp(l); err != nil {
			return err
		}
	}
	for _, r := range []struct{ dst, src string }{{"0.0.0.0/0", "10.9.9.9"}, {"::/0", "2001:db8:ffff::9"}} {
		_, dst, _ := net.ParseCIDR(r.dst)
		if err := h.RouteAdd(&netlink.Route{LinkIndex: hl.Attrs().Index, Dst: dst, Src: net.ParseIP(r.src)}); err != nil {
			return fmt.Errorf("route %s: %w", r.dst, err)
		}
	}
	e, err := Open(root, "")
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	defer e.Detach()

	// This process's cgroup chain, as the kernel sees it.
	var chain []uint64
	cgs := []string{"no/such/cgroup"}
	cgLine, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return err
	}
	for _, l := range strings.Split(string(cgLine), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok {
			for p = strings.Trim(p, "/"); ; p = filepath.Dir(p) {
				if p == "." {
					p = ""
				}
				var st unix.Stat_t
				if err := unix.Stat(filepath.Join(root, p), &st); err != nil {
					return err
				}
				chain = append(chain, st.Ino)
				if p == "" {
					break
				}
				cgs = append(cgs, p)
			}
		}
	}
	comm, _ := os.ReadFile("/proc/thread-self/comm")
	self := Conn{UID: uint32(os.Getuid()), GID: uint32(os.Getgid()), Cgroups: chain, Comm: strings.TrimSpace(string(comm))}

	rng := rand.New(rand.NewPCG(3, 5))
	const policies, conns = 40, 40
	kernelDecided := 0
	for pi := 0; pi < policies; pi++ {
		b := genPolicy(rng, cgs)
		cfg, err := policy.Parse("corpus.toml", []byte(b.String()))
		if err != nil {
			return err
		}
		im, err := Compile(cfg, root)
		if err != nil {
			return err
		}
		var states [3][2]bool
		us := make([]Uplink, 3)
		for i := range us {
			states[i] = [2]bool{rng.IntN(4) != 0, rng.IntN(4) != 0}
			us[i] = Uplink{Mark: uint32(100 + i), Up4: states[i][0], Up6: states[i][1],
				Addr4: netip.MustParseAddr(upAddrs4[i]), Addr6: netip.MustParseAddr(upAddrs6[i])}
		}
		if err := e.SetUplinks(us); err != nil {
			return err
		}
		if err := e.Apply(im); err != nil {
			return err
		}
		up := func(u int, v6 bool) bool { return states[u][map[bool]int{false: 0, true: 1}[v6]] }
		for ci := 0; ci < conns; ci++ {
			c := self
			c.Proto = []ipproto.Proto{ipproto.TCP, ipproto.UDP}[rng.IntN(2)]
			c.Dst = netip.AddrPortFrom(netip.MustParseAddr(corpusAddrs[rng.IntN(len(corpusAddrs))]), uint16([]int{53, 54, 80, 81, 443, 1 + rng.IntN(9500)}[rng.IntN(6)]))
			want := im.Decide(c, up)
			local, err := connectOnce(c)
			var got string
			switch {
			case errors.Is(err, unix.EPERM):
				got = "refused"
			case err != nil:
				return fmt.Errorf("connect %s %v: %w", c.Proto, c.Dst, err)
			default:
				got = "left alone"
				for i := range us {
					if local == us[i].Addr4 || local == us[i].Addr6 {
						got = fmt.Sprintf("uplink %d", i)
					}
				}
			}
			expect := "left alone"
			switch {
			case want.Refuse:
				expect = "refused"
			case want.Uplink >= 0:
				expect = fmt.Sprintf("uplink %d", want.Uplink)
				if want.Balanced && strings.HasPrefix(got, "uplink ") {
					for _, cand := range want.Candidates {
						if got == fmt.Sprintf("uplink %d", cand) {
							expect = got
						}
					}
				}
			}
			if got != expect {
				return fmt.Errorf("policy %d, %s to %v: the program did %q (bound %v), the image says %q (%+v)\n%s",
					pi, c.Proto, c.Dst, got, local, expect, want, b.String())
			}
			if !want.Stop {
				kernelDecided++
			}
		}
	}
	t.Logf("%d of %d connections decided alike by the program and the image", kernelDecided, policies*conns)
	return nil
}

// connectOnce connects a non-blocking socket to c.Dst and returns the
// address it is bound to.
func connectOnce(c Conn) (netip.Addr, error) {
	fam, typ := unix.AF_INET6, unix.SOCK_STREAM
	var sa unix.Sockaddr = &unix.SockaddrInet6{Port: int(c.Dst.Port()), Addr: c.Dst.Addr().As16()}
	if c.Dst.Addr().Is4() {
		fam, sa = unix.AF_INET, &unix.SockaddrInet4{Port: int(c.Dst.Port()), Addr: c.Dst.Addr().As4()}
	}
	if c.Proto == ipproto.UDP {
		typ = unix.SOCK_DGRAM
	}
	fd, err := unix.Socket(fam, typ|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return netip.Addr{}, err
	}
	defer unix.Close(fd)
	if err := unix.Connect(fd, sa); err != nil && !errors.Is(err, unix.EINPROGRESS) {
		return netip.Addr{}, err
	}
	la, err := unix.Getsockname(fd)
	if err != nil {
		return netip.Addr{}, err
	}
	switch a := la.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrFrom4(a.Addr), nil
	case *unix.SockaddrInet6:
		return netip.AddrFrom16(a.Addr), nil
	}
	return netip.Addr{}, fmt.Errorf("unexpected socket address %T", la)
}
