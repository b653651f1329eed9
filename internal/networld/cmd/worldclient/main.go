// Command worldclient is the test world's client program: it connects to a
// networld server, optionally sends bytes, and prints what the server saw.
// Tests copy it under several names to act as different applications.
//
//	worldclient -connect 192.0.2.80:80 [-send N] [-hold]
//	worldclient -connect 192.0.2.80:5201,192.0.2.80:5202 -many N
//
// prints "peer=ADDR:PORT received=N" and exits 0, or prints the error and
// exits 1. With -hold it waits for standard input to close before sending.
// With -many it opens N connections over the addresses in turn, prints
// "open N", and keeps them until standard input closes (for scale tests:
// one process may hold only so many sockets).
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/rerouted/rerouted/internal/networld"
	"golang.org/x/sys/unix"
)

func main() {
	addr := flag.String("connect", "", "server ADDR:PORT")
	send := flag.Int64("send", 0, "bytes to send")
	hold := flag.Bool("hold", false, "print the peer, then wait for stdin to close before sending")
	timeout := flag.Duration("timeout", 3*time.Second, "connect timeout")
	many := flag.Int("many", 0, "open this many connections and hold them until stdin closes")
	floodUDP := flag.Int("flood-udp", 0, "send this many datagrams to -connect, round robin over 256 sockets, as fast as possible")
	floodSYN := flag.Int("flood-connect", 0, "start this many connections to -connect, closing each at once (one SYN each)")
	flag.Parse()
	if *floodUDP > 0 || *floodSYN > 0 {
		if err := flood(*addr, *floodUDP, *floodSYN); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		return
	}
	if *many > 0 {
		if err := networld.HoldMany(strings.Split(*addr, ","), *many, *timeout, os.Stdin, os.Stdout); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		return
	}
	if err := run(*addr, *send, *hold, *timeout); err != nil {
		fmt.Println("error:", err)
		os.Exit(1)
	}
}

func run(addr string, send int64, hold bool, timeout time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	tc := c.(*net.TCPConn)
	r := bufio.NewReader(c)
	peer, err := networld.Greeting(r)
	if err != nil {
		return err
	}
	if hold {
		fmt.Printf("peer=%s\n", peer)
		io.Copy(io.Discard, os.Stdin)
	}
	if _, err := io.CopyN(c, zeros{}, send); err != nil {
		return err
	}
	tc.CloseWrite()
	line, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	count, _, _ := strings.Cut(strings.TrimSpace(line), " ")
	n, err := strconv.ParseInt(count, 10, 64)
	if err != nil {
		return err
	}
	// What the kernel sent again: on the wire, and in any count of it.
	var retrans uint64
	if rc, err := tc.SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) {
			if ti, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
				retrans = ti.Bytes_retrans
			}
		})
	}
	fmt.Printf("peer=%s received=%d retrans_bytes=%d\n", peer, n, retrans)
	return nil
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) { clear(p); return len(p), nil }

// flood is a local user's flood of new flows: datagrams from many sockets,
// and connections started and abandoned at once.
func flood(addr string, datagrams, connects int) error {
	dst, err := netip.ParseAddrPort(addr)
	if err != nil {
		return err
	}
	if datagrams > 0 {
		var socks []*net.UDPConn
		for i := 0; i < 256; i++ {
			c, err := net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(dst))
			if err != nil {
				return err
			}
			defer c.Close()
			socks = append(socks, c)
		}
		for i := 0; i < datagrams; i++ {
			socks[i%len(socks)].Write([]byte("flood")) // a full buffer drops it: so be it
		}
	}
	sa := &unix.SockaddrInet4{Addr: dst.Addr().As4(), Port: int(dst.Port())}
	for i := 0; i < connects; i++ {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK, 0)
		if err != nil {
			return err
		}
		unix.Connect(fd, sa) // EINPROGRESS: the SYN is on its way
		unix.Close(fd)
	}
	fmt.Printf("flooded datagrams=%d connects=%d\n", datagrams, connects)
	return nil
}
