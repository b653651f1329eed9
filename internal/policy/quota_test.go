package policy

import (
	"strings"
	"testing"
	"time"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[any]uint64{"5MB": 5e6, "50GiB": 50 << 30, "1.5 TB": 1.5e12, "512": 512, int64(7): 7, "10 KiB": 10240, "0B": 0} {
		if got, err := ParseSize(in); err != nil || got != want {
			t.Errorf("ParseSize(%v) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []any{"5XB", "MB", "-3MB", int64(-1), 3.5, "1e30 TB"} {
		if _, err := ParseSize(in); err == nil {
			t.Errorf("ParseSize(%v): no error", in)
		}
	}
}

// The quota keys' mistakes are reported at their line and column.
func TestQuotaConfigErrors(t *testing.T) {
	src := `[[uplink]]
name = "lte"
mark = 7
quota = "5XB"
quota_period = "year"
quota_reset = 0

[[uplink]]
name = "b"
mark = 8
on_quota = "keep"

[[uplink]]
name = "c"
mark = 9
quota = "1GB"
quota_period = "week"
quota_reset = 8
standby = "yes"
`
	_, err := Parse("q.toml", []byte(src))
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{
		`q.toml:4:1: quota must be a size`,
		`q.toml:5:1: quota_period must be "day", "week" or "month"`,
		`q.toml:6:1: quota_reset 0 is out of range 1-28`,
		`q.toml:11:1: on_quota needs a quota`,
		`q.toml:18:1: quota_reset of a week is a weekday`,
		`q.toml:19:1: standby must be true or false`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("missing %q in:\n%v", want, err)
		}
	}
	cfg, err := Parse("q.toml", []byte("[usage]\nenabled = false\n[[uplink]]\nname = \"b\"\nmark = 8\nquota = \"5MB\"\n"))
	if err == nil || !strings.Contains(err.Error(), "q.toml:6:1: a quota is counted by usage accounting") {
		t.Errorf("a quota without accounting: %v, %v", cfg, err)
	}
}

func TestQuotaStart(t *testing.T) {
	loc := time.UTC
	now := time.Date(2026, 12, 7, 13, 5, 0, 0, loc) // a Monday
	for _, c := range []struct {
		period string
		reset  int
		want   time.Time
	}{
		{"day", 1, time.Date(2026, 12, 7, 0, 0, 0, 0, loc)},
		{"week", 1, time.Date(2026, 12, 7, 0, 0, 0, 0, loc)},
		{"week", 3, time.Date(2026, 12, 2, 0, 0, 0, 0, loc)},
		{"month", 1, time.Date(2026, 12, 1, 0, 0, 0, 0, loc)},
		{"month", 15, time.Date(2026, 11, 15, 0, 0, 0, 0, loc)},
		{"month", 7, time.Date(2026, 12, 7, 0, 0, 0, 0, loc)},
	} {
		u := &Uplink{QuotaPeriod: c.period, QuotaReset: c.reset}
		if got := u.QuotaStart(now); !got.Equal(c.want) {
			t.Errorf("%s from %d: %v, want %v", c.period, c.reset, got, c.want)
		}
	}
}
