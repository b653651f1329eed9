// Package control is the daemon's control socket: the server that answers
// `rerouted flows`, `rerouted uplinks` and `rerouted usage`, and the client those commands,
// doctor and the end-to-end tests use.
package control

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rerouted/rerouted/internal/uplink"
	"github.com/rerouted/rerouted/internal/usage"
)

// The control protocol: a client connects to the unix socket, writes one JSON
// request line, and reads one JSON response; then both close.
type request struct {
	Cmd string `json:"cmd"`
}

// FlowsReply is the answer to "flows", and what `rerouted flows --json` prints.
type FlowsReply struct {
	Flows []FlowInfo `json:"flows"`
	Error string     `json:"error,omitempty"`
}

// FlowInfo is one translated flow, in conntrack's terms: Original is the
// socket's tuple, Reply is what the wire carries back.
type FlowInfo struct {
	Proto      string  `json:"proto"`
	Original   Tuple   `json:"original"`
	Reply      Tuple   `json:"reply"`
	Mark       uint32  `json:"mark"`
	Dev        string  `json:"dev"`
	UID        uint32  `json:"uid"`
	Rule       string  `json:"rule"`
	PID        int     `json:"pid,omitempty"`
	Comm       string  `json:"comm,omitempty"`
	Exe        string  `json:"exe,omitempty"`
	Cgroup     string  `json:"cgroup,omitempty"`
	Cookie     uint64  `json:"cookie"`
	AgeSeconds float64 `json:"age_seconds"`
}

// Tuple is a connection's addresses and ports.
type Tuple struct {
	Src   netip.Addr `json:"src"`
	Dst   netip.Addr `json:"dst"`
	Sport uint16     `json:"sport"`
	Dport uint16     `json:"dport"`
}

// Swap is the tuple seen from the other end.
func (t Tuple) Swap() Tuple { return Tuple{Src: t.Dst, Dst: t.Src, Sport: t.Dport, Dport: t.Sport} }

// String formats a flow like `conntrack -L`: the original tuple, then the
// reply tuple.
func (fi FlowInfo) String() string {
	return fmt.Sprintf("%s src=%s dst=%s sport=%d dport=%d src=%s dst=%s sport=%d dport=%d mark=%d dev=%s uid=%d rule=%q age=%.0fs",
		fi.Proto, fi.Original.Src, fi.Original.Dst, fi.Original.Sport, fi.Original.Dport,
		fi.Reply.Src, fi.Reply.Dst, fi.Reply.Sport, fi.Reply.Dport, fi.Mark, fi.Dev, fi.UID, fi.Rule, fi.AgeSeconds)
}

// A Source is what the control socket reports on: the daemon.
type Source interface {
	// Flows calls fn with each flow to list, and returns fn's first error.
	Flows(fn func(FlowInfo) error) error
	// Uplinks returns each uplink's state in each family, with its live
	// flows.
	Uplinks() []UplinkInfo
	// Usage reads the kernel's counts afresh and reports every owner's
	// usage of every uplink; an error if accounting is off.
	Usage() (usage.Report, error)
}

// Serve answers the clients that connect to ln, one goroutine each, until
// ctx is done; then it closes ln.
func Serve(ctx context.Context, ln net.Listener, src Source, log *slog.Logger) {
	go func() { <-ctx.Done(); ln.Close() }()
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() == nil {
				log.Error("control socket accept", "err", err)
			}
			return
		}
		go answer(c, src, log)
	}
}

func answer(c net.Conn, src Source, log *slog.Logger) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	var req request
	line, err := bufio.NewReader(io.LimitReader(c, 4096)).ReadBytes('\n')
	if err == nil {
		err = json.Unmarshal(line, &req)
	}
	// The socket file is 0600, but its mode is only as good as whoever
	// may change it: the peer's credentials decide. (The request is read
	// first, so that the refusal is the answer the client reads, not a
	// broken pipe on its write.)
	if uid, cerr := peerUID(c); cerr != nil || uid != 0 {
		log.Warn("control socket: refused a client that is not root", "uid", uid, "err", cerr)
		json.NewEncoder(c).Encode(FlowsReply{Error: "permission denied: the control socket answers root only"})
		return
	}
	switch {
	case err != nil:
		err = json.NewEncoder(c).Encode(FlowsReply{Error: "bad request: " + err.Error()})
	case req.Cmd == "flows":
		err = writeFlows(c, src)
	case req.Cmd == "uplinks":
		err = json.NewEncoder(c).Encode(uplinksReply(src))
	case req.Cmd == "usage":
		r, uerr := src.Usage()
		if uerr != nil {
			r = usage.Report{Error: uerr.Error()}
		}
		err = json.NewEncoder(c).Encode(r)
	default:
		err = json.NewEncoder(c).Encode(FlowsReply{Error: fmt.Sprintf("unknown command %q", req.Cmd)})
	}
	if err != nil {
		log.Warn("control socket reply", "err", err)
	}
}

// writeFlows streams {"flows": [...]} one flow at a time: listing 100,000
// flows must not hold them all twice in memory.
func writeFlows(c net.Conn, src Source) error {
	w := bufio.NewWriterSize(c, 64<<10)
	enc := json.NewEncoder(w)
	w.WriteString(`{"flows":[`)
	n := 0
	if err := src.Flows(func(fi FlowInfo) error {
		if n > 0 {
			w.WriteByte(',')
		}
		n++
		return enc.Encode(fi)
	}); err != nil {
		return err
	}
	w.WriteString("]}\n")
	return w.Flush()
}

// peerUID returns the uid of the process at the other end of a unix socket
// (SO_PEERCRED).
func peerUID(c net.Conn) (int64, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return -1, fmt.Errorf("not a unix socket: %T", c)
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return -1, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := rc.Control(func(fd uintptr) { cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED) }); err != nil {
		return -1, err
	}
	if cerr != nil {
		return -1, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return int64(cred.Uid), nil
}

// QueryFlows asks the daemon listening on path for its flows.
func QueryFlows(path string) ([]FlowInfo, error) {
	var reply FlowsReply
	if err := query(path, "flows", &reply); err != nil {
		return nil, err
	}
	if reply.Error != "" {
		return nil, errors.New(reply.Error)
	}
	return reply.Flows, nil
}

// UplinksReply is the answer to "uplinks", and what `rerouted uplinks
// --json` prints.
type UplinksReply struct {
	Uplinks []UplinkInfo `json:"uplinks"`
	Error   string       `json:"error,omitempty"`
}

// UplinkInfo is one uplink's state in one family, with its live flows.
type UplinkInfo struct {
	uplink.Status
	Flows int `json:"flows"`
}

func uplinksReply(src Source) UplinksReply {
	r := UplinksReply{Uplinks: src.Uplinks()}
	if r.Uplinks == nil {
		r.Uplinks = []UplinkInfo{}
	}
	return r
}

// QueryUplinks asks the daemon listening on path for its uplinks' states.
func QueryUplinks(path string) ([]UplinkInfo, error) {
	var reply UplinksReply
	if err := query(path, "uplinks", &reply); err != nil {
		return nil, err
	}
	if reply.Error != "" {
		return nil, errors.New(reply.Error)
	}
	return reply.Uplinks, nil
}

// QueryUsage asks the daemon listening on path for its usage report.
func QueryUsage(path string) (usage.Report, error) {
	var reply usage.Report
	if err := query(path, "usage", &reply); err != nil {
		return usage.Report{}, err
	}
	if reply.Error != "" {
		return usage.Report{}, errors.New(reply.Error)
	}
	return reply, nil
}

// query sends one request and decodes its answer into reply.
func query(path, cmd string, reply any) error {
	c, err := net.DialTimeout("unix", path, 3*time.Second)
	if err != nil {
		return dialError(path, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if err := json.NewEncoder(c).Encode(request{Cmd: cmd}); err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if err := json.NewDecoder(c).Decode(reply); err != nil {
		return fmt.Errorf("control socket reply: %w", err)
	}
	return nil
}

// dialError words a failure to reach the control socket: a caller the
// socket's permissions keep out needs root; otherwise the daemon may not be
// running.
func dialError(path string, err error) error {
	if errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
		return fmt.Errorf("%s: permission denied: the control socket answers root only (run it as root, e.g. with sudo)", path)
	}
	return fmt.Errorf("is rerouted running? %w", err)
}
