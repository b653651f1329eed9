package usage

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// State is what the state file keeps: the totals of ended sockets, by
// uplink and owner, and the uplinks' indexes in the kernel's counts.
type State struct {
	Version int       `json:"version"`
	Since   time.Time `json:"since"`
	Uplinks []string  `json:"uplinks"` // index → name, "default" first
	Ended   []Row     `json:"ended"`
	// Retiring are the sockets whose counts Ended has, written before the
	// kernel forgot them: if it had not yet (a crash in between), the next
	// run retires them without counting them again.
	Retiring []uint64 `json:"retiring,omitempty"`
	// Owners and Live are the owners of live sockets (Live: cookie,
	// index in Owners), as attributed when the file was written: a
	// restart keeps what only the daemon knew of them (their rule, the
	// executable of a process gone since).
	Owners []Owner     `json:"owners,omitempty"`
	Live   [][2]uint64 `json:"live,omitempty"`
	// Quotas: for each uplink with a quota, when its period began and
	// its total (in and out) then: what it used since is its total less
	// Base.
	Quotas map[string]QuotaBase `json:"quotas,omitempty"`

	index map[rowKey]int
}

const stateVersion = 1

// QuotaBase is where an uplink's quota period began.
type QuotaBase struct {
	Start time.Time `json:"start"`
	Base  uint64    `json:"base"` // its total bytes then
}

// NewState is the state of a first run.
func NewState(now time.Time) *State {
	return &State{Version: stateVersion, Since: now.UTC().Truncate(time.Second), Uplinks: []string{Default}}
}

// StateError is a state file the daemon refuses: it names the file, what
// is wrong with it, and what to do.
type StateError struct {
	Path, Problem, Fix string
}

func (e *StateError) Error() string {
	return fmt.Sprintf("usage state %s: %s; %s", e.Path, e.Problem, e.Fix)
}

// LoadState reads the state file at path; a missing file is a first run.
// A file that is not root's alone, or not a state file, is refused: its
// counts are not to be trusted, nor silently replaced.
func LoadState(path string, now time.Time) (*State, error) {
	f, err := os.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return NewState(now), nil
	}
	if err != nil {
		return nil, fmt.Errorf("usage state: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("usage state: %w", err)
	}
	move := "move it away to start counting afresh"
	if !fi.Mode().IsRegular() {
		return nil, &StateError{path, "not a regular file", move}
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && st.Uid != uint32(os.Geteuid()) {
		return nil, &StateError{path, fmt.Sprintf("owned by uid %d, not by the daemon's (%d): anyone who owns it can change the counts", st.Uid, os.Geteuid()),
			"check who made it, then chown it or " + move}
	}
	if fi.Mode().Perm()&0o022 != 0 {
		return nil, &StateError{path, fmt.Sprintf("writable by others (mode %04o)", fi.Mode().Perm()), "chmod go-w it, or " + move}
	}
	var s State
	dec := json.NewDecoder(f)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return nil, &StateError{path, "corrupt: " + err.Error(), move}
	}
	if s.Version != stateVersion {
		return nil, &StateError{path, fmt.Sprintf("version %d, this rerouted reads version %d", s.Version, stateVersion), move}
	}
	if len(s.Uplinks) == 0 || s.Uplinks[0] != Default {
		return nil, &StateError{path, "corrupt: its uplinks do not begin with \"default\"", move}
	}
	rows := s.Ended // merged, should a row appear twice
	s.Ended = nil
	for _, r := range rows {
		s.add(rowKey{r.Uplink, r.Owner}, r.Counts)
	}
	return &s, nil
}

// add adds c to the ended totals of rk.
func (s *State) add(rk rowKey, c Counts) {
	if s.index == nil {
		s.index = map[rowKey]int{}
		for i, r := range s.Ended {
			s.index[rowKey{r.Uplink, r.Owner}] = i
		}
	}
	i, ok := s.index[rk]
	if !ok {
		s.Ended = append(s.Ended, Row{Uplink: rk.uplink, Owner: rk.Owner})
		i = len(s.Ended) - 1
		s.index[rk] = i
	}
	s.Ended[i].Counts.Add(c)
}

// Write replaces the file at path atomically: a new file beside it,
// synced, renamed over it, and the directory synced. A crash leaves the
// old file or the new one, never a part of either.
func (s *State) Write(path string) error {
	b, err := json.MarshalIndent(s, "", "\t")
	if err != nil {
		return fmt.Errorf("usage state: %w", err)
	}
	b = append(b, '\n')
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("usage state: %w", err)
	}
	f, err := os.CreateTemp(dir, ".usage-*.tmp")
	if err != nil {
		return fmt.Errorf("usage state: %w", err)
	}
	tmp := f.Name()
	_, err = f.Write(b)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("usage state %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
