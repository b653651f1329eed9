package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"
)

// sdNotify tells systemd about the daemon's state (Type=notify units):
// "READY=1" once the rules are installed and the queues bound, "STOPPING=1"
// when it begins to remove them. Without NOTIFY_SOCKET it does nothing.
func sdNotify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' { // an abstract socket
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("notify systemd: %w", err)
	}
	defer c.Close()
	c.SetWriteDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte(state)); err != nil {
		return fmt.Errorf("notify systemd: %w", err)
	}
	return nil
}

// newLogger returns the daemon's logger: logfmt lines on w. Under systemd
// (JOURNAL_STREAM set, the journal reads w) each line starts with its
// syslog priority, "<3>" for errors and so on, so journalctl -p works, and
// carries no time of its own: the journal stamps it.
func newLogger(w io.Writer, level slog.Level) *slog.Logger {
	if os.Getenv("JOURNAL_STREAM") == "" {
		return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
	}
	j := &journalHandler{w: w, mu: new(sync.Mutex), buf: new(bytes.Buffer)}
	j.inner = slog.NewTextHandler(j.buf, &slog.HandlerOptions{Level: level,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if len(groups) == 0 && a.Key == slog.TimeKey {
				return slog.Attr{}
			}
			return a
		}})
	return slog.New(j)
}

// journalHandler prefixes each record with its syslog priority.
type journalHandler struct {
	w     io.Writer
	mu    *sync.Mutex   // shared by handlers derived with WithAttrs/WithGroup
	buf   *bytes.Buffer // the inner handler writes here, under mu
	inner slog.Handler
}

func (j *journalHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return j.inner.Enabled(ctx, l)
}

func (j *journalHandler) Handle(ctx context.Context, r slog.Record) error {
	j.mu.Lock()
	defer j.mu.Unlock()
	j.buf.Reset()
	prio := "<6>" // info
	switch {
	case r.Level >= slog.LevelError:
		prio = "<3>"
	case r.Level >= slog.LevelWarn:
		prio = "<4>"
	case r.Level < slog.LevelInfo:
		prio = "<7>"
	}
	j.buf.WriteString(prio)
	if err := j.inner.Handle(ctx, r); err != nil {
		return err
	}
	_, err := j.w.Write(j.buf.Bytes())
	return err
}

func (j *journalHandler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *j
	c.inner = j.inner.WithAttrs(as)
	return &c
}

func (j *journalHandler) WithGroup(name string) slog.Handler {
	c := *j
	c.inner = j.inner.WithGroup(name)
	return &c
}
