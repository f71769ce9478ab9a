package agent

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/store/atomicfile"
)

// state is what the agent keeps in its --state directory besides the spool:
// its identity (machine id, certificate, pinned CA) and each disk's index
// and initial-replication progress as acknowledged by the server.
type state struct {
	Version   int         `json:"version"`
	MachineID string      `json:"machine_id"`
	Name      string      `json:"name"`
	Server    string      `json:"server"`    // control URL used to register
	DataAddr  string      `json:"data_addr"` // host:port of the data listener
	Disks     []diskState `json:"disks"`
	Acked     uint64      `json:"acked"` // last sequence number the server acknowledged
	// Resync is the resync in progress, if any.
	Resync *resyncState `json:"resync,omitempty"`
	// BootID is the machine's boot id when the agent last started: another
	// one at an unclean start means the machine itself went down.
	BootID string `json:"boot_id,omitempty"`
	// Overflow is set while the spool overflows (changes are tracked in
	// memory only).
	Overflow bool `json:"overflow,omitempty"`
	// LogID names this agent's log (Hello.LogID): made with the state, so
	// an agent that registers again, or lost its state, has another one,
	// and the server never joins its records to the old log by number.
	LogID string `json:"log_id,omitempty"`
}

type diskState struct {
	Index  uint32 `json:"index"`
	Name   string `json:"name"`
	Path   string `json:"path"`
	Size   int64  `json:"size"`
	Cursor int64  `json:"cursor"` // initial replication: bytes read and acknowledged
	Done   bool   `json:"done"`
	// Diverged says why the log may no longer match the disk (a failed
	// write that could not be re-read); the server marks the disk for resync.
	Diverged       string              `json:"diverged,omitempty"`
	DivergedRanges []replication.Range `json:"diverged_ranges,omitempty"`
}

const (
	stateFile  = "state.json"
	certFile   = "cert.pem"
	keyFile    = "key.pem"
	caFile     = "ca.pem"
	cleanFile  = "clean" // present while the agent is stopped cleanly
	spoolDir   = "spool"
	stateVersn = 1
)

func loadState(dir string) (*state, error) {
	b, err := os.ReadFile(filepath.Join(dir, stateFile))
	if err != nil {
		return nil, err
	}
	var s state
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("agent state %s: %w", filepath.Join(dir, stateFile), err)
	}
	if s.Version != stateVersn {
		return nil, fmt.Errorf("agent state %s: version %d not supported", filepath.Join(dir, stateFile), s.Version)
	}
	return &s, nil
}

func (s *state) save(dir string) error {
	s.Version = stateVersn
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return atomicfile.Write(filepath.Join(dir, stateFile), b, 0o600)
}

// newLogID returns a random log id: 64 bits, in hex.
func newLogID() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

func (s *state) disk(name string) *diskState {
	for i := range s.Disks {
		if s.Disks[i].Name == name {
			return &s.Disks[i]
		}
	}
	return nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return !errors.Is(err, os.ErrNotExist)
}
