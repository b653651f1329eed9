package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rerouted/rerouted/internal/control"
	"github.com/rerouted/rerouted/internal/networld"
)

// demoConfig is the embedded default the demo runs the daemon with.
const demoConfig = `# rerouted demo: ISP B is reached with fwmark 100 (ip rule fwmark 100 table 100)
[daemon]
queue = 0
honor_marks = true
control_socket = %q

[[uplink]]
name = "isp-b"
mark = 100
interface = "hb"

[[rule]]
name = "alt-http via isp-b"
uplink = "isp-b"
dport = [8080]

[[rule]]
name = "dns via isp-b"
uplink = "isp-b"
protocol = "udp"
dport = [53]

[[rule]]
name = "ping via isp-b"
uplink = "isp-b"
protocol = "icmp"
`

func cmdDemo(args []string) int {
	var daemonBin string
	flags("demo", args, func(fs *flag.FlagSet) { daemonFlag(fs, &daemonBin) })
	if os.Geteuid() != 0 {
		fmt.Fprintln(os.Stderr, "rerouted-lab demo builds network namespaces and needs root: sudo rerouted-lab demo")
		return exitFailure
	}
	bin, err := findDaemon(daemonBin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "rerouted-lab demo: %v\n", err)
		return exitFailure
	}
	if err := demo(os.Stdout, bin); err != nil {
		fmt.Fprintf(os.Stderr, "\ndemo failed: %v\n", err)
		return exitFailure
	}
	return exitOK
}

// demo runs the demo with bin, the rerouted daemon.
func demo(out io.Writer, bin string) (err error) {
	say := func(format string, a ...any) { fmt.Fprintf(out, format+"\n", a...) }
	step := func(format string, a ...any) { fmt.Fprintf(out, "\n== "+format+"\n", a...) }
	dir, err := os.MkdirTemp("", "rerouted-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)

	step("Building the world: a host with two ISPs that drop packets with a foreign source (BCP38)")
	w, err := networld.New(fmt.Sprintf("rrdemo%d", os.Getpid()), func(f string, a ...any) { say("   "+f, a...) })
	if err != nil {
		return err
	}
	defer func() {
		step("Cleaning up")
		err = errors.Join(err, w.Close())
		say("   removed namespaces %s-{host,ispa,ispb,net}", w.Prefix)
	}()
	for _, port := range []uint16{80, 8080, 443} {
		if _, err := w.Serve(port); err != nil {
			return err
		}
	}
	if _, err := w.ServeUDP(53); err != nil {
		return err
	}
	say("   host routes: default via ISP A (%s); fwmark %d and 'from %s' use table %d via ISP B", networld.HostA, networld.MarkB, networld.HostB, networld.TabB)
	say("   servers on %s: TCP ports 80, 8080, 443; UDP port 53; it answers ping", networld.ServerAddr)

	step("The problem: the host marks port 80 traffic for ISP B, and a packet leaves ISP B with ISP A's address")
	markRule := "table inet hostmark {\n\tchain output {\n\t\ttype route hook output priority mangle; policy accept;\n\t\ttcp dport 80 meta mark set 100\n\t}\n}\n"
	say("   nft: tcp dport 80 meta mark set 100   (like iptables -t mangle -A OUTPUT -p tcp --dport 80 -j MARK --set-mark 100)")
	if err := w.Host.Nft(markRule); err != nil {
		return err
	}
	before, err := w.B.Counter("foreign")
	if err != nil {
		return err
	}
	_, ferr := w.Fetch(80, 2*time.Second)
	after, err := w.B.Counter("foreign")
	if err != nil {
		return err
	}
	if ferr == nil {
		return fmt.Errorf("the marked connection succeeded without rerouted: the world does not reproduce the problem")
	}
	say("   connect %s:80 -> %v", networld.ServerAddr, ferr)
	say("   ISP B dropped %d packets with a foreign source: the SYN left through ISP B carrying %s", after-before, networld.HostA)

	step("Starting rerouted --debug in the host namespace")
	cfgFile := filepath.Join(dir, "rerouted.toml")
	sock := filepath.Join(dir, "rerouted.sock")
	if err := os.WriteFile(cfgFile, []byte(fmt.Sprintf(demoConfig, sock)), 0o600); err != nil {
		return err
	}
	say("%s", indent(fmt.Sprintf(demoConfig, sock), "   | "))
	d, err := w.StartDaemon(bin, cfgFile, prefixWriter{out, "   rerouted> "}, "--debug")
	if err != nil {
		return err
	}
	defer func() {
		if d != nil {
			d.Kill()
		}
	}()
	if err := d.WaitReadyWithin(30 * time.Second); err != nil {
		return fmt.Errorf("%w\n%s", err, d.Output())
	}

	step("The same marked connection, with rerouted")
	before, _ = w.B.Counter("foreign")
	c, err := w.Dial(networld.DialOptions{Port: 80})
	if err != nil {
		return fmt.Errorf("marked connection with rerouted: %w", err)
	}
	peer, n, err := networld.Exchange(c, 1<<20)
	if err != nil {
		c.Close()
		return err
	}
	say("   connected; the server saw the client as %s and received %d bytes", peer, n)
	time.Sleep(100 * time.Millisecond) // let the debug line reach the screen first
	flows, err := control.QueryFlows(sock)
	if err != nil {
		return err
	}
	say("   rerouted flows (socket tuple, then the reply tuple on the wire):")
	for _, f := range flows {
		say("     %s", f)
	}
	c.Close()
	after, _ = w.B.Counter("foreign")
	say("   ISP B dropped %d packets this time", after-before)

	if strings.Contains(d.Output(), "connect-time steering: rules the kernel can decide") {
		step("A TOML rule instead of a host mark: port 8080 via isp-b, decided inside connect()")
		c, err := w.Dial(networld.DialOptions{Port: 8080})
		if err != nil {
			return err
		}
		peer, _, err = networld.Exchange(c, 0)
		local := c.LocalAddr()
		c.Close()
		if err != nil {
			return err
		}
		if _, err := d.WaitFor("[BIND] tcp", 3*time.Second); err != nil {
			return err
		}
		say("   the socket itself is on %s (its own getsockname) and the server saw %s:", local, peer)
		say("   a BPF program bound it to ISP B's address in connect(); nothing was queued or translated")
	} else {
		step("A TOML rule instead of a host mark: port 8080 via isp-b, aborted with RST")
		peer, err = w.Abort(8080, 3*time.Second)
		if err != nil {
			return err
		}
		say("   the server saw %s; the client reset the connection, so its socket is gone at once", peer)
		if _, err := d.WaitFor("[DESTROY] tcp", 10*time.Second); err != nil {
			return err
		}
		say("   the next sock_diag sweep removed the flow's kernel entries")
	}
	step("A port no rule matches stays on ISP A, untranslated and never seen again by rerouted")
	peer, err = w.Fetch(443, 3*time.Second)
	if err != nil {
		return err
	}
	say("   the server saw %s", peer)

	step("UDP and ping by TOML rules: the first datagram decides, the kernel does the rest")
	dns := netip.AddrPortFrom(networld.ServerAddr, 53)
	u, err := w.UDPSocket(dns, false, netip.AddrPort{})
	if err != nil {
		return err
	}
	for i := 0; i < 3; i++ {
		peer, err := networld.AskUDP(u, dns, "query", 3*time.Second)
		if err != nil {
			u.Close()
			return fmt.Errorf("udp to %s: %w", dns, err)
		}
		say("   datagram %d from an unconnected socket: the server saw %s", i+1, peer)
	}
	u.Close()
	id, err := w.Ping(networld.ServerAddr, networld.PingSocket, 0, 3*time.Second)
	if err != nil {
		return fmt.Errorf("ping %s: %w", networld.ServerAddr, err)
	}
	say("   ping %s (identifier %d): answered", networld.ServerAddr, id)
	time.Sleep(100 * time.Millisecond)

	step("Stopping rerouted (SIGTERM): it removes its table and control socket")
	say("   (the port 80 flow is still in TIME_WAIT, which keeps its entries for 60 s)")
	err = d.Stop()
	d = nil
	if err != nil {
		return fmt.Errorf("rerouted did not stop cleanly: %w", err)
	}
	tables, err := w.Host.Run("nft", "list", "tables")
	if err != nil {
		return err
	}
	say("   tables left on the host: %s", strings.Join(strings.Fields(tables), " "))
	if _, err := os.Stat(sock); err == nil {
		return fmt.Errorf("control socket %s left behind", sock)
	}
	return nil
}

type prefixWriter struct {
	w      io.Writer
	prefix string
}

func (p prefixWriter) Write(b []byte) (int, error) {
	_, err := io.WriteString(p.w, indent(string(b), p.prefix))
	return len(b), err
}

func indent(s, prefix string) string {
	s = strings.TrimRight(s, "\n")
	return prefix + strings.ReplaceAll(s, "\n", "\n"+prefix) + "\n"
}
