package agent

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"

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
	// MemoryLog is set while an agent with a memory log runs (saved at
	// its start): an unclean stop then lost the records in memory.
	MemoryLog bool `json:"memory_log,omitempty"`
	// LogID names this agent's log (Hello.LogID): made with the state, so
	// an agent that registers again, or lost its state, has another one,
	// and the server never joins its records to the old log by number.
	LogID string `json:"log_id,omitempty"`
	// Failover is the planned failover the machine is frozen under
	// (failover.go), "" if none: guest writes are refused until its THAW,
	// also after a restart.
	Failover string `json:"failover,omitempty"`
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

func (s *state) diskByIndex(index uint32) *diskState {
	for i := range s.Disks {
		if s.Disks[i].Index == index {
			return &s.Disks[i]
		}
	}
	return nil
}

func exists(path string) bool {
	_, err := os.Stat(path)
	return !errors.Is(err, os.ErrNotExist)
}

// errJobReplaced is returned for a resync job that is no longer the one the
// state holds (a newer job or a new log replaced it).
var errJobReplaced = errors.New("the job was replaced")

// stateStore is the agent's state file and its lock: every change to the
// state is made under the lock and, where it must survive a crash before
// anything depends on it, saved before the lock is released.
type stateStore struct {
	dir string
	mu  sync.Mutex // guards st and its file
	st  *state
}

func newStateStore(dir string, st *state) *stateStore {
	return &stateStore{dir: dir, st: st}
}

// save writes the state as it is (at a stop).
func (s *stateStore) save() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.save(s.dir)
}

// update changes the state with fn and saves it.
func (s *stateStore) update(fn func(*state)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn(s.st)
	return s.st.save(s.dir)
}

// Identity: fixed once the agent is open.

func (s *stateStore) machineID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.MachineID
}

func (s *stateStore) logID() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.LogID
}

func (s *stateStore) dataAddr() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.DataAddr
}

// server is the control URL the agent registered with.
func (s *stateStore) server() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.Server
}

func (s *stateStore) name() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.Name
}

// fillDiverged copies each disk's divergence into the Hello's disks.
func (s *stateStore) fillDiverged(disks []replication.DiskInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range disks {
		if ds := s.st.diskByIndex(disks[i].Index); ds != nil {
			disks[i].Diverged, disks[i].DivergedRanges = ds.Diverged, ds.DivergedRanges
		}
	}
}

// markDiverged records, durably, that a disk's log and its contents may
// disagree, unless the disk is already marked.
func (s *stateStore) markDiverged(index uint32, reason string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	ds := s.st.diskByIndex(index)
	if ds == nil || ds.Diverged != "" {
		return nil
	}
	ds.Diverged = reason
	return s.st.save(s.dir)
}

// clearDiverged forgets the divergences the server has been told of (the
// disks of a Hello it accepted), unless they changed since.
func (s *stateStore) clearDiverged(told []replication.DiskInfo) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := false
	for _, di := range told {
		ds := s.st.diskByIndex(di.Index)
		if ds != nil && di.Diverged != "" && ds.Diverged == di.Diverged {
			ds.Diverged, ds.DivergedRanges = "", nil
			changed = true
		}
	}
	if !changed {
		return nil
	}
	return s.st.save(s.dir)
}

// acked records the server's acknowledgement of seq and the initial-copy
// progress it made durable. The state is saved only when a cursor moved:
// the acknowledged sequence alone is saved with the next change (the
// spool knows it too).
func (s *stateStore) acked(seq uint64, marks []progressMark) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.Acked = seq
	if len(marks) == 0 {
		return nil
	}
	for _, m := range marks {
		if ds := s.st.diskByIndex(m.disk); ds != nil && m.cursor > ds.Cursor {
			ds.Cursor = m.cursor
			ds.Done = ds.Done || m.done
		}
	}
	return s.st.save(s.dir)
}

// setOverflow records whether the spool overflows. Entering is undone if
// it cannot be saved (the caller then does not enter: an overflow the next
// start does not know of would lose its changed blocks); leaving stays
// done in memory even if the save fails (the next start then compares the
// disks in full: costly, never wrong).
func (s *stateStore) setOverflow(on bool) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.Overflow = on
	err := s.st.save(s.dir)
	if err != nil && on {
		s.st.Overflow = false
	}
	return err
}

// setFailover records the planned failover the machine is frozen under
// ("" once thawed). Undone in memory if it cannot be saved.
func (s *stateStore) setFailover(id string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	prev := s.st.Failover
	s.st.Failover = id
	if err := s.st.save(s.dir); err != nil {
		s.st.Failover = prev
		return err
	}
	return nil
}

// failover returns the planned failover the state says the machine is
// frozen under, or "".
func (s *stateStore) failover() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.Failover
}

// overflowing reports whether the state says the spool overflows.
func (s *stateStore) overflowing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.Overflow
}

// resyncJob returns a copy of the resync in progress, or nil.
func (s *stateStore) resyncJob() *resyncState {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.st.Resync == nil {
		return nil
	}
	st := *s.st.Resync
	return &st
}

// startResync saves a new resync job, replacing one in progress. It
// reports false, saving nothing, if the job is the one in progress (a
// resent request).
func (s *stateStore) startResync(job replication.ResyncJob) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur := s.st.Resync; cur != nil && cur.Job.ID == job.ID {
		return false, nil
	}
	s.st.Resync = &resyncState{Job: job}
	return true, s.st.save(s.dir)
}

// updateResync changes the job in progress, if it is still job id, and
// saves it; it returns the job as saved.
func (s *stateStore) updateResync(id uint64, fn func(*resyncState)) (resyncState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.st.Resync == nil || s.st.Resync.Job.ID != id {
		return resyncState{}, errJobReplaced
	}
	fn(s.st.Resync)
	return *s.st.Resync, s.st.save(s.dir)
}

// resyncCurrent reports whether job id is the one in progress.
func (s *stateStore) resyncCurrent(id uint64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st.Resync != nil && s.st.Resync.Job.ID == id
}

// endResync forgets job id, if it is the one in progress (reported), and
// saves the state either way.
func (s *stateStore) endResync(id uint64) (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ended := false
	if s.st.Resync != nil && s.st.Resync.Job.ID == id {
		s.st.Resync = nil
		ended = true
	}
	return ended, s.st.save(s.dir)
}

// dropResync forgets the resync in progress, whatever it is.
func (s *stateStore) dropResync() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.Resync = nil
	return s.st.save(s.dir)
}

// startNewLog records a new log from durable+1: the copied disks count as
// copied (cursor at their size), the others are copied again from their
// start; the resync and the overflow of the old log are forgotten.
func (s *stateStore) startNewLog(durable uint64, copied map[uint32]bool, sizes map[uint32]int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.Acked = durable
	for i := range s.st.Disks {
		ds := &s.st.Disks[i]
		ds.Done, ds.Cursor = copied[ds.Index], 0
		if ds.Done {
			ds.Cursor = sizes[ds.Index]
		}
	}
	// A resync the server asked for belongs to the old log: the new log's
	// resync replaces it.
	s.st.Resync, s.st.Overflow = nil, false
	return s.st.save(s.dir)
}
