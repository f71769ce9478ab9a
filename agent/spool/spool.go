// Package spool is the agent's on-disk change log: every change the
// write-splitter or the initial copy captures is appended here, in the
// machine's sequence order, before the process server has acknowledged it.
//
// A spool is a directory of files named by the first sequence number they
// hold (%016x.spool). Each file has a header and then records in the
// replication.Record encoding. Appends are group commits: the records
// appended while the first of them gathers its batch are written with a
// single write(2), so a killed agent leaves at most one torn batch at the
// tail (whose appends had not returned), which Open cuts off at its first
// torn record.
// Files are deleted once every record in them is acknowledged.
//
// The spool is bounded: Append blocks (back-pressure reaching the guest's
// writes) while the unacknowledged bytes exceed the limit.
//
// With Options.MemBytes set the spool is a bounded memory log in front of
// its files: records are kept in memory, from where the shipper reads them,
// and the oldest are written to the files (spilled) only while the memory
// holds more than MemBytes, i.e. while the server falls behind. In steady
// state a record is then never written on the guest. A killed process
// loses the records in memory: the agent names their extents in its
// activity log until they are acknowledged, and resyncs those extents
// after an unclean start (docs/ARCHITECTURE.md, "The memory log"). A clean
// Close spills every record first. The files always hold a prefix of the
// unacknowledged sequence and the memory the rest.
//
// Records are appended in one order and completed (the write to the backing
// disk done) in possibly another; the spool hands the shipper only the prefix
// of records that are all complete (Shippable), so an acknowledged record is
// always one the source disk holds too. At most MaxInFlight records are
// appended past the first incomplete one (Append waits), so after a kill
// the records whose change may not have reached the disk are among the
// last MaxInFlight (Recovered.Recent).
package spool

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/store/atomicfile"
)

// File header layout (little endian, 24 bytes):
//
//	0  magic   "ASRSPL"
//	6  version u16
//	8  first   u64 first sequence number in the file
//	16 -       u32 (zero)
//	20 hcrc    u32 CRC-32C of bytes 0..19
const (
	headerSize = 24
	version    = 1
	suffix     = ".spool"
)

var magic = [6]byte{'A', 'S', 'R', 'S', 'P', 'L'}

// ErrClosed is returned by operations on a closed spool.
var ErrClosed = errors.New("spool closed")

// Options configure a spool.
type Options struct {
	// MaxBytes bounds the unacknowledged bytes; Append waits above it.
	MaxBytes int64
	// FileBytes is the size at which a new file is started.
	FileBytes int64
	// MemBytes, when set, keeps records in memory and writes them to the
	// files only while more than MemBytes are held (the memory log).
	MemBytes int64
}

// Spool is an open spool directory. It is safe for concurrent use.
type Spool struct {
	dir  string
	opts Options

	mu       sync.Mutex
	cond     *sync.Cond // signalled on ack, completion, close
	closed   bool
	files    []*file // ordered by first seq; the last is the one appended to
	next     uint64  // next sequence number to give out
	acked    uint64  // last acknowledged sequence number
	bytes    int64   // bytes in files (headers included)
	written  int64   // bytes of records written to files since Open (Written)
	inflight []pending
	shipSeq  uint64 // last shippable sequence number
	buf      []byte

	// The memory log (Options.MemBytes): mem holds the records after the
	// files' last one, oldest first, encoded in ring (mapped once, outside
	// the Go heap: see newRing; no garbage per record); memBytes their
	// size (also in bytes). marks are where spills began in the files (a
	// reader that read records from memory finds them again there after a
	// spill).
	mem      []memRec
	memArr   []memRec // the array mem is in (pushMem)
	memBytes int64
	// ringHigh is the end of the ring's part touched since ringReleased,
	// when its pages past ringKeep were last given back.
	ringHigh     int
	ringReleased time.Time
	ring         []byte
	marks        []mark

	// samples of (seq, time) of appended records, at most one per
	// sampleEvery, for OldestPending; popped as records are acknowledged.
	samples       []sample
	lastAckedTime int64
	lastTime      int64 // time of the last record appended

	syncMu  sync.Mutex // serializes fsync calls (group commit)
	synced  uint64     // records up to this seq are durable
	syncErr error      // sticky: after a failed fsync nothing is known durable

	// cutErr is sticky (guarded by mu): a write failed and cutting its
	// torn bytes off failed too, so the file may hold garbage where the
	// next record would go. Nothing more is appended or flushed until a
	// restart, whose Open cuts the torn tail.
	cutErr error
	// waiters counts the appends waiting in waitLocked (for tests).
	waiters int
	// held makes appends wait (Hold, Release).
	held bool
	// batch is the group commit being gathered (commitLocked), batchBuf
	// the buffer the next one reuses, batches how many were written.
	batch    *batch
	batchBuf []byte
	batches  int
	// gathering, in tests, runs while a batch's writer lets other
	// appenders join.
	gathering func()
}

type file struct {
	dirty bool // written since its last fsync
	first uint64
	last  uint64 // last seq written (first-1 if empty)
	size  int64
	f     appendFile
	path  string
}

// appendFile is what the spool does with the file it appends to: an
// *os.File, or in tests one whose operations fail.
type appendFile interface {
	io.Writer
	io.Seeker
	Truncate(size int64) error
	Sync() error
	Close() error
}

// memRec is a record of the memory log, encoded in ring[off:off+n]. It
// holds no pointer, so the garbage collector never scans the log's index.
type memRec struct {
	seq uint64
	off int
	n   int
}

// rec returns the encoded record m.
func (s *Spool) rec(m memRec) []byte { return s.ring[m.off : m.off+m.n] }

// mark is the place of record seq in a file.
type mark struct {
	seq uint64
	pos Position
}

type sample struct {
	seq  uint64
	time int64
}

// sampleEvery is the resolution of OldestPending.
const sampleEvery = int64(10 * time.Millisecond)

type pending struct {
	seq  uint64
	done bool
}

// Position is a place in the spool: a file (by its first seq) and an offset.
type Position struct {
	File   uint64
	Offset int64
}

// MaxInFlight bounds the records appended and not yet completed, counted
// from the first incomplete one: Append waits while that many are.
const MaxInFlight = 64

// Tail describes a change record the spool held when it was opened; after
// an unclean stop its change may not have reached the backing disk.
type Tail struct {
	Disk   uint32
	Kind   replication.Kind
	Offset uint64
	Length uint32
}

// Recovered is what Open found in an existing spool.
type Recovered struct {
	Records   int
	Truncated int64 // bytes of torn tail cut off
	// Recent are the guest's change records (write, zero, trim) among
	// the last MaxInFlight records, in sequence order: every change that
	// may have been logged and not written (or the reverse) when the agent
	// stopped is one of them. (Base records are read from the disk and
	// complete at once: never in flight.)
	Recent   []Tail
	Progress map[uint32]replication.Record
	last     []Tail // the last MaxInFlight records (Kind 0: not a change)
}

// Open opens or creates the spool in dir. acked is the last sequence number
// the agent knows to be acknowledged (records up to it may be discarded);
// next is the sequence number to start with when the spool is empty.
func Open(dir string, opts Options, acked uint64) (*Spool, Recovered, error) {
	if opts.MaxBytes <= 0 {
		opts.MaxBytes = 1 << 30
	}
	if opts.FileBytes <= 0 {
		opts.FileBytes = 64 << 20
	}
	if opts.FileBytes > opts.MaxBytes/4 {
		opts.FileBytes = opts.MaxBytes / 4
	}
	if opts.MemBytes < 0 || opts.MemBytes > opts.MaxBytes/2 {
		return nil, Recovered{}, fmt.Errorf("spool: memory log of %d bytes: want 0 to half of the spool's %d", opts.MemBytes, opts.MaxBytes)
	}
	var rec Recovered
	rec.Progress = map[uint32]replication.Record{}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, rec, err
	}
	s := &Spool{dir: dir, opts: opts, acked: acked, next: acked + 1}
	s.cond = sync.NewCond(&s.mu)
	names, err := filepath.Glob(filepath.Join(dir, "*"+suffix))
	if err != nil {
		return nil, rec, err
	}
	sort.Strings(names)
	for i, path := range names {
		f, err := s.openFile(path, i == len(names)-1, &rec)
		if err != nil {
			s.closeFiles()
			return nil, rec, err
		}
		if f == nil {
			continue
		}
		if len(s.files) > 0 && f.first > s.next && f.first <= acked+1 {
			// A gap the caller's acks cover: the files before it are all
			// acknowledged (a start with acks ahead of the files, below,
			// stopped before it trimmed them).
			for _, old := range s.files {
				old.f.Close()
				if err := os.Remove(old.path); err != nil && !errors.Is(err, os.ErrNotExist) {
					f.f.Close()
					return nil, rec, err
				}
			}
			s.files, s.bytes = nil, 0
		}
		if len(s.files) > 0 && f.first != s.next {
			s.closeFiles()
			return nil, rec, fmt.Errorf("spool %s: file %s starts at seq %d, want %d: %w",
				dir, filepath.Base(path), f.first, s.next, replication.ErrCorrupt)
		}
		if len(s.files) == 0 && f.first > acked+1 {
			// Files are deleted only once acknowledged, so the records
			// before this file were: the caller's record of acks lags.
			s.acked = f.first - 1
		}
		s.files = append(s.files, f)
		s.next = f.last + 1
		s.bytes += f.size
	}
	if s.next <= acked {
		// Everything in the spool was acknowledged (the files may even
		// end before the acks: a forced shutdown lost their tail after
		// the state file had recorded the server's acks).
		s.next = acked + 1
	}
	if len(s.files) == 0 || s.files[len(s.files)-1].size >= s.opts.FileBytes || s.files[len(s.files)-1].last+1 != s.next {
		// A new file where the last one cannot take seq s.next (full, or
		// its records end before the acks: the next record must be found
		// under its own number); trimLocked then drops the acknowledged.
		if err := s.newFile(s.next); err != nil {
			s.closeFiles()
			return nil, rec, err
		}
	}
	for _, t := range rec.last {
		if t.Kind != 0 {
			rec.Recent = append(rec.Recent, t)
		}
	}
	rec.last = nil
	// What a killed process left may still be only in the page cache:
	// made durable here, before anything counts on it (the activity log
	// of that run is dropped once the disks are synced too).
	for _, f := range s.files {
		if err := f.f.Sync(); err != nil {
			s.closeFiles()
			return nil, rec, fmt.Errorf("spool: sync %s: %w", f.path, err)
		}
	}
	if opts.MemBytes > 0 {
		if s.ring, err = newRing(int(opts.MemBytes)); err != nil {
			s.closeFiles()
			return nil, rec, fmt.Errorf("spool: memory log of %d bytes: %w", opts.MemBytes, err)
		}
	}
	s.shipSeq = s.next - 1
	s.synced = s.next - 1
	s.trimLocked()
	return s, rec, nil
}

// openFile validates one spool file and indexes its records. A torn record at
// the end of the last file is truncated; damage anywhere else is an error.
func (s *Spool) openFile(path string, last bool, rec *Recovered) (*file, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	data := make([]byte, headerSize)
	if _, err := io.ReadFull(f, data); err != nil || st.Size() < headerSize {
		if last {
			// Crashed while creating the file: nothing in it was ever written.
			f.Close()
			return nil, os.Remove(path)
		}
		f.Close()
		return nil, fmt.Errorf("spool file %s: short header: %w", path, replication.ErrCorrupt)
	}
	first, err := parseHeader(data)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("spool file %s: %w", path, err)
	}
	sf := &file{first: first, last: first - 1, size: headerSize, f: f, path: path}
	hdr := make([]byte, replication.RecordHeaderSize)
	var body []byte
	for sf.size < st.Size() {
		n, err := f.ReadAt(hdr, sf.size)
		if err == nil || (err == io.EOF && n == len(hdr)) {
			var r replication.Record
			r, err = peekHeader(hdr)
			if err == nil {
				need := 0
				if r.Kind.HasData() {
					need = int(r.Length)
				}
				if rest := st.Size() - sf.size - replication.RecordHeaderSize; int64(need) > rest {
					// A length the file does not hold (a torn tail or
					// damage): allocate nothing from it.
					err = fmt.Errorf("record of %d data bytes, the file holds %d more: %w", need, max(rest, 0), replication.ErrCorrupt)
				} else {
					if cap(body) < replication.RecordHeaderSize+need {
						body = make([]byte, replication.RecordHeaderSize+need)
					}
					body = body[:replication.RecordHeaderSize+need]
					_, err = f.ReadAt(body, sf.size)
				}
				if err == nil || errors.Is(err, io.EOF) {
					var full replication.Record
					var used int
					full, used, err = replication.DecodeRecord(body)
					if err == nil && full.Seq != sf.last+1 {
						err = fmt.Errorf("seq %d, want %d: %w", full.Seq, sf.last+1, replication.ErrCorrupt)
					}
					if err == nil {
						sf.last = full.Seq
						sf.size += int64(used)
						rec.Records++
						noteRecord(rec, &full)
						s.lastTime = max(s.lastTime, full.Time)
						continue
					}
				}
			}
		}
		if !last {
			f.Close()
			return nil, fmt.Errorf("spool file %s: record at byte %d: %v: %w", path, sf.size, err, replication.ErrCorrupt)
		}
		// Torn tail of the file being written when the agent stopped.
		rec.Truncated = st.Size() - sf.size
		if err := f.Truncate(sf.size); err != nil {
			f.Close()
			return nil, err
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return nil, err
		}
		break
	}
	if _, err := f.Seek(sf.size, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	return sf, nil
}

func noteRecord(rec *Recovered, r *replication.Record) {
	if len(rec.last) == MaxInFlight {
		rec.last = append(rec.last[:0], rec.last[1:]...)
	}
	t := Tail{Disk: r.Disk, Kind: r.Kind, Offset: r.Offset, Length: r.Length}
	switch r.Kind {
	case replication.KindWrite, replication.KindZero, replication.KindTrim:
		rec.last = append(rec.last, t)
	default:
		rec.last = append(rec.last, Tail{})
	}
	if r.Kind == replication.KindProgress {
		r.Data = nil
		rec.Progress[r.Disk] = *r
	}
}

// peekHeader decodes a record header without its data (for sizing).
func peekHeader(h []byte) (replication.Record, error) {
	var r replication.Record
	r.Seq = binary.LittleEndian.Uint64(h[0:])
	r.Kind = replication.Kind(h[20])
	r.Length = binary.LittleEndian.Uint32(h[32:])
	if r.Kind < replication.KindWrite || r.Kind > replication.KindResync {
		return r, fmt.Errorf("unknown kind %d: %w", r.Kind, replication.ErrCorrupt)
	}
	if r.Kind.HasData() && r.Length > replication.MaxRecordData {
		return r, fmt.Errorf("length %d: %w", r.Length, replication.ErrCorrupt)
	}
	return r, nil
}

func header(first uint64) []byte {
	h := make([]byte, headerSize)
	copy(h, magic[:])
	binary.LittleEndian.PutUint16(h[6:], version)
	binary.LittleEndian.PutUint64(h[8:], first)
	binary.LittleEndian.PutUint32(h[20:], replication.Checksum(h[:20]))
	return h
}

func parseHeader(h []byte) (uint64, error) {
	if [6]byte(h[0:6]) != magic {
		return 0, fmt.Errorf("bad magic: %w", replication.ErrCorrupt)
	}
	if got, want := replication.Checksum(h[:20]), binary.LittleEndian.Uint32(h[20:]); got != want {
		return 0, fmt.Errorf("header checksum: %w", replication.ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint16(h[6:]); v != version {
		return 0, fmt.Errorf("version %d not supported: %w", v, replication.ErrCorrupt)
	}
	return binary.LittleEndian.Uint64(h[8:]), nil
}

// newFile starts a new file whose first record will be first. The previous one is not fsync'd here:
// Sync covers every dirty file, and not forcing each full file to disk lets
// records that are acknowledged soon never be written back at all.
func (s *Spool) newFile(first uint64) error {
	path := filepath.Join(s.dir, fmt.Sprintf("%016x%s", first, suffix))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(header(first)); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := atomicfile.SyncDir(s.dir); err != nil {
		f.Close()
		os.Remove(path)
		return err
	}
	s.files = append(s.files, &file{first: first, last: first - 1, size: headerSize, f: f, path: path})
	s.bytes += headerSize
	return nil
}

func (s *Spool) endPos() Position {
	cur := s.files[len(s.files)-1]
	return Position{File: cur.first, Offset: cur.size}
}

// Append writes r to the spool, assigning it the next sequence number, and
// returns that number. The record is not yet shippable: the caller must call
// Complete(seq) once the change is on the backing disk too. Append waits while
// the spool is full, until ctx is done.
func (s *Spool) Append(ctx context.Context, r *replication.Record) (uint64, error) {
	return s.append(ctx, r, false)
}

// ErrFull is returned by TryAppend when the spool is over its soft limit.
var ErrFull = errors.New("spool full")

// Hold makes every append (TryAppend too) wait until
// Release: the agent holds its log after an unclean start with the memory
// log until it knows where the server's records end (Rebase), so that no
// record of the new run is numbered as one the server already holds.
func (s *Spool) Hold() {
	s.mu.Lock()
	s.held = true
	s.mu.Unlock()
}

// Release ends a Hold.
func (s *Spool) Release() {
	s.mu.Lock()
	if s.held {
		s.held = false
		s.cond.Broadcast()
	}
	s.mu.Unlock()
}

// softLimit is the share of MaxBytes above which TryAppend refuses: the rest
// is kept for the records that mark the start of an overflow.
const softLimit = 0.9

// TryAppend is Append for the guest's writes: instead of waiting for room
// above the soft limit it returns ErrFull at once (the agent then tracks
// the change in a changed-block map; see the agent's overflow).
func (s *Spool) TryAppend(r *replication.Record) (uint64, error) {
	return s.append(context.Background(), r, true)
}

func (s *Spool) append(ctx context.Context, r *replication.Record, try bool) (uint64, error) {
	size := int64(r.EncodedSize())
	s.mu.Lock()
	defer s.mu.Unlock()
	soft := int64(softLimit * float64(s.opts.MaxBytes))
	over := func(limit int64) bool { return s.bytes+size > limit && s.bytes > headerSize }
	// Every condition is checked again after each wait: another append
	// may have taken the room, failed (cutErr) or the spool closed
	// meanwhile.
	for {
		if s.cutErr != nil {
			return 0, s.cutErr
		}
		if s.closed {
			return 0, ErrClosed
		}
		if s.held {
			if err := ctx.Err(); err != nil {
				return 0, err
			}
			s.waitLocked(ctx) // TryAppend too: the hold is short
			continue
		}
		if over(s.opts.MaxBytes) || try && over(soft) {
			if s.acked+1 == s.next && len(s.files) == 1 && len(s.mem) == 0 {
				// Everything is acknowledged but the current file holds it:
				// start a new file so the old one can go.
				if err := s.newFile(s.next); err != nil {
					return 0, fmt.Errorf("spool: %w", err)
				}
				s.trimLocked()
				continue
			}
			if try {
				return 0, ErrFull
			}
			if err := ctx.Err(); err != nil {
				return 0, err
			}
			s.waitLocked(ctx)
			continue
		}
		// A record too large for a batch is written alone, after the
		// batch being gathered (its writer is running).
		if s.batch != nil && size >= batchRecord && s.opts.MemBytes == 0 {
			s.waitLocked(ctx)
			continue
		}
		// The in-flight window (see MaxInFlight): the first incomplete
		// record completes without any lock its appenders may hold.
		if len(s.inflight) >= MaxInFlight {
			if err := ctx.Err(); err != nil {
				return 0, err
			}
			s.waitLocked(ctx)
			continue
		}
		break
	}
	if s.closed {
		return 0, ErrClosed
	}
	at := -1 // the record's place in the memory log's ring
	if s.opts.MemBytes > 0 {
		at = s.ringAlloc(int(size))
		if at < 0 && len(s.mem) > 0 {
			// The server falls behind: the oldest records go to the
			// files, down to three quarters of the bound (spills come
			// in batches), and more until the record fits.
			if err := s.spillLocked(min(s.opts.MemBytes*3/4, s.opts.MemBytes-size)); err != nil {
				return 0, err
			}
			for at = s.ringAlloc(int(size)); at < 0 && len(s.mem) > 0; at = s.ringAlloc(int(size)) {
				if err := s.spillLocked(s.memBytes - int64(s.mem[0].n)); err != nil {
					return 0, err
				}
			}
		}
		// A record larger than the memory log goes to the files, after
		// every record in memory (all spilled above).
	}
	r.Seq = s.next
	// Times never go back along the sequence: recovery to a point in time
	// takes exactly the records up to it. The caller's time was read before
	// this lock, so the clamped time is still no later than now.
	if r.Time < s.lastTime {
		r.Time = s.lastTime
	}
	s.lastTime = r.Time
	if at >= 0 {
		b := replication.AppendRecord(s.ring[at:at:at+int(size)], r)
		if len(b) != int(size) {
			// Not in its place in the ring (a spill writes the ring).
			return 0, fmt.Errorf("spool: record seq %d encoded to %d bytes, not %d", r.Seq, len(b), size)
		}
		s.pushMem(memRec{seq: r.Seq, off: at, n: len(b)})
		s.ringHigh = max(s.ringHigh, at+len(b))
		s.memBytes += size
		s.bytes += size
	} else if s.opts.MemBytes == 0 && size < batchRecord {
		return s.commitLocked(r, size)
	} else {
		s.buf = replication.AppendRecord(s.buf[:0], r)
		err := s.writeLocked(s.buf, r.Seq, r.Seq)
		if cap(s.buf) > 4<<20 {
			s.buf = nil // do not keep a huge buffer around
		}
		if err != nil {
			return 0, err
		}
		s.bytes += size
	}
	s.next++
	s.inflight = append(s.inflight, pending{seq: r.Seq})
	s.sampleLocked(r)
	return r.Seq, nil
}

func (s *Spool) sampleLocked(r *replication.Record) {
	if n := len(s.samples); n == 0 || r.Time-s.samples[n-1].time >= sampleEvery {
		s.samples = append(s.samples, sample{r.Seq, r.Time})
	}
}

// batch is a group commit: records appended while another append writes,
// written to the file together with one write(2).
//
// Records of batchRecord bytes or more are written alone: their write(2)
// and pages are already few per byte, and gathering them would copy them
// into a buffer of up to MaxInFlight of them.
const batchRecord = 64 << 10

type batch struct {
	buf         []byte // the encoded records first..last
	first, last uint64
	writing     bool  // an appender writes it (the first)
	done        bool  // written, or failed with err
	err         error // every appender of the batch gets it
}

// commitLocked numbers r in the batch being gathered and returns once the
// batch is in the file (as an append without batches returns once its
// record is: the caller then writes the disk). The first appender of a
// batch writes it: it first lets the other runnable appenders join (on a
// guest's one CPU the handlers of the requests in flight run one after
// another), so that the records of the requests in flight cost one
// write(2), and a page of the file is touched once rather than by two
// records each. If the write fails, every appender of the batch gets the
// error and the batch's numbers are given back: nothing after it was
// numbered (the batch is written under mu).
func (s *Spool) commitLocked(r *replication.Record, size int64) (uint64, error) {
	b := s.batch
	if b == nil {
		b = &batch{first: r.Seq, buf: s.batchBuf[:0]}
		s.batchBuf = nil
		s.batch = b
	}
	b.buf = replication.AppendRecord(b.buf, r)
	b.last = r.Seq
	s.bytes += size
	s.next++
	s.inflight = append(s.inflight, pending{seq: r.Seq})
	s.sampleLocked(r)
	if !b.writing {
		b.writing = true
		s.mu.Unlock()
		runtime.Gosched()
		if s.gathering != nil {
			s.gathering()
		}
		s.mu.Lock()
		s.writeBatchLocked(b)
	}
	for !b.done {
		s.cond.Wait()
	}
	if b.err != nil {
		return 0, b.err
	}
	return r.Seq, nil
}

// writeBatchLocked writes b, which every record numbered since it began
// is in, and wakes its appenders.
func (s *Spool) writeBatchLocked(b *batch) {
	s.batch = nil
	s.batches++
	var err error
	switch {
	case s.cutErr != nil:
		err = s.cutErr
	case s.closed:
		err = ErrClosed
	default:
		err = s.writeLocked(b.buf, b.first, b.last)
	}
	if err != nil {
		s.next = b.first
		s.bytes -= int64(len(b.buf))
		for len(s.inflight) > 0 && s.inflight[len(s.inflight)-1].seq >= b.first {
			s.inflight = s.inflight[:len(s.inflight)-1]
		}
		for len(s.samples) > 0 && s.samples[len(s.samples)-1].seq >= b.first {
			s.samples = s.samples[:len(s.samples)-1]
		}
	}
	b.err, b.done = err, true
	if cap(b.buf) <= 4<<20 {
		s.batchBuf = b.buf[:0] // the appenders of b no longer read it
	}
	b.buf = nil
	s.cond.Broadcast()
}

// ringAlloc returns the offset of room for n bytes in the ring after the
// memory log's last record (wrapping to the start), or -1 if there is none.
//
// It wraps to the start as soon as the record would otherwise reach past
// the part of the ring touched since its pages were last given back
// (ringHigh) and the start has room for twice what the log holds: under
// continuous churn the log seldom empties, and appends that went on to
// the ring's end touched every page of it (the agent's RSS was the whole
// ring above the spool log's: 81 against 51 MiB at 100 MB/s with 32 MiB),
// where the records in flight need only a few MiB. The touched part now
// grows only when the records not yet acknowledged need it: about three
// times what the log holds. The price: while wrapped, the log holds at
// most what the start had room for, so a backlog that grows more than
// threefold within one turn of the ring spills before the ring is full
// (and the next turn goes further).
func (s *Spool) ringAlloc(n int) int {
	at := -1
	if len(s.mem) == 0 {
		if n <= len(s.ring) {
			at = 0
		}
	} else {
		head, last := s.mem[0].off, s.mem[len(s.mem)-1]
		tail := last.off + last.n
		switch {
		case last.off >= head && tail+n <= len(s.ring) && (tail+n <= s.ringHigh || int64(head) < 2*s.memBytes+int64(n)): // after the last
			at = tail
		case last.off >= head && n <= head: // wrapped to the start
			at = 0
		case last.off < head && tail+n <= head: // wrapped already
			at = tail
		}
	}
	return at
}

// pushMem appends m to mem. Records leave mem at the front (acks,
// spills): when mem reaches its array's end, the records left are moved
// back to the array's start, and a new array is made only when they fill
// half of it, so the steady state allocates nothing per record.
func (s *Spool) pushMem(m memRec) {
	if len(s.mem) == cap(s.mem) {
		if len(s.mem) == 0 && cap(s.memArr) > 1<<16 {
			s.memArr = nil // a backlog's index, not kept once it is gone
		}
		if 2*len(s.mem) > cap(s.memArr) || s.memArr == nil {
			s.memArr = make([]memRec, 2*len(s.mem)+256)
		}
		s.mem = s.memArr[:copy(s.memArr, s.mem)]
	}
	s.mem = append(s.mem, m)
}

// fileNextLocked is the sequence number of the first record not in the
// files: the memory log's first, or the next to be given out.
func (s *Spool) fileNextLocked() uint64 {
	if len(s.mem) > 0 {
		return s.mem[0].seq
	}
	if s.batch != nil {
		return s.batch.first
	}
	return s.next
}

// spillLocked writes the memory log's oldest records to the files until it
// holds at most target bytes.
func (s *Spool) spillLocked(target int64) error {
	for s.memBytes > target && len(s.mem) > 0 {
		cur := s.files[len(s.files)-1]
		if cur.last+1 != s.mem[0].seq {
			// Records after the files' end were acknowledged and dropped
			// from memory without ever being spilled: every file holds
			// only acknowledged records (acknowledgements come in order).
			// The files start again at the memory's first record, the old
			// ones removed first so a crash never leaves a gap between
			// files.
			if err := s.restartFilesLocked(s.mem[0].seq); err != nil {
				return err
			}
			cur = s.files[len(s.files)-1]
		} else if cur.size >= s.opts.FileBytes {
			if err := s.newFile(s.mem[0].seq); err != nil {
				return fmt.Errorf("spool: %w", err)
			}
			cur = s.files[len(s.files)-1]
		}
		// One write(2) for a batch of records, at most 4 MiB or the
		// file's room, whichever ends first (at least one record), and
		// straight from the ring: a batch ends where the ring wraps (a
		// batch across the wrap was copied into a buffer first, of up
		// to 4 MiB, allocated anew each time).
		var n int
		var size int64
		for n < len(s.mem) && s.memBytes-size > target {
			l := int64(s.mem[n].n)
			if n > 0 && (size+l > 4<<20 || cur.size+size+l > s.opts.FileBytes ||
				s.mem[n].off != s.mem[n-1].off+s.mem[n-1].n) {
				break
			}
			size += l
			n++
		}
		at := Position{File: cur.first, Offset: cur.size}
		b := s.ring[s.mem[0].off : s.mem[n-1].off+s.mem[n-1].n]
		if err := s.writeLocked(b, s.mem[0].seq, s.mem[n-1].seq); err != nil {
			return err
		}
		s.marks = append(s.marks, mark{seq: s.mem[0].seq, pos: at})
		s.memBytes -= size
		clear(s.mem[:n])
		s.mem = s.mem[n:]
	}
	if len(s.mem) == 0 {
		s.mem = nil
	}
	return nil
}

// restartFilesLocked removes every file (all acknowledged), newest first,
// and starts an empty one at first.
func (s *Spool) restartFilesLocked(first uint64) error {
	for i := len(s.files) - 1; i >= 0; i-- {
		f := s.files[i]
		if err := os.Remove(f.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("spool: %w", err)
		}
		f.f.Close()
		s.bytes -= f.size
		s.files = s.files[:i]
	}
	s.marks = nil
	if err := atomicfile.SyncDir(s.dir); err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	if err := s.newFile(first); err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	return nil
}

// writeLocked appends b, the encoded records first..last, to the current
// file (starting a new one first if it is full) with one write(2).
func (s *Spool) writeLocked(b []byte, first, last uint64) error {
	if s.files[len(s.files)-1].size >= s.opts.FileBytes {
		if err := s.newFile(first); err != nil {
			return fmt.Errorf("spool: %w", err)
		}
	}
	cur := s.files[len(s.files)-1]
	if _, err := cur.f.Write(b); err != nil {
		// The file may now hold a torn record; cut it off so later records
		// are not written after garbage. If that fails too, no later
		// record may follow (Open would cut it off with the garbage).
		cut := cur.f.Truncate(cur.size)
		if cut == nil {
			_, cut = cur.f.Seek(cur.size, io.SeekStart)
		}
		if cut != nil {
			s.cutErr = fmt.Errorf("spool: a write to %s failed and its torn bytes could not be cut off, so nothing more is logged until the agent restarts: %w",
				filepath.Base(cur.path), errors.Join(err, cut))
			return s.cutErr
		}
		return fmt.Errorf("spool write: %w", err)
	}
	cur.size += int64(len(b))
	cur.last = last
	cur.dirty = true
	s.written += int64(len(b))
	return nil
}

// Written returns the bytes of records written to the spool's files since
// Open: every record with the spool log; with the memory log only what it
// spilled (and what a clean stop writes).
func (s *Spool) Written() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.written
}

// waitLocked waits on the condition variable but wakes up when ctx is done.
func (s *Spool) waitLocked(ctx context.Context) {
	stop := context.AfterFunc(ctx, func() {
		s.mu.Lock()
		s.cond.Broadcast()
		s.mu.Unlock()
	})
	s.waiters++
	s.cond.Wait()
	s.waiters--
	stop()
}

// Complete marks seq's change as done on the backing disk.
func (s *Spool) Complete(seq uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	advanced := false
	for i := range s.inflight {
		if s.inflight[i].seq == seq {
			s.inflight[i].done = true
			break
		}
	}
	for len(s.inflight) > 0 && s.inflight[0].done {
		s.shipSeq = s.inflight[0].seq
		s.inflight = s.inflight[1:]
		advanced = true
	}
	if advanced {
		s.cond.Broadcast()
	}
}

// Sync makes every record appended so far durable.
func (s *Spool) Sync() error {
	s.syncMu.Lock()
	defer s.syncMu.Unlock()
	if s.syncErr != nil {
		return s.syncErr
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	if s.cutErr != nil {
		// The log takes no more changes: every flush says so, as after a
		// failed fsync, until a restart repairs it.
		s.mu.Unlock()
		return s.cutErr
	}
	// Records in memory are not made durable (the activity log names
	// their extents, and the disk holds their changes).
	target := s.fileNextLocked() - 1
	if s.synced >= target {
		s.mu.Unlock()
		return nil
	}
	var dirty []*file
	for _, f := range s.files {
		if f.dirty {
			f.dirty = false
			dirty = append(dirty, f)
		}
	}
	s.mu.Unlock()
	for _, f := range dirty {
		if err := f.f.Sync(); err != nil {
			if errors.Is(err, os.ErrClosed) {
				continue // trimmed meanwhile: its records are acknowledged
			}
			// A later fsync may report success for pages the kernel
			// dropped: from now on no flush can be promised.
			s.syncErr = fmt.Errorf("spool sync failed, flushes cannot be honoured until the agent restarts: %w", err)
			return s.syncErr
		}
	}
	s.mu.Lock()
	if target > s.synced {
		s.synced = target
	}
	s.mu.Unlock()
	return nil
}

// Ack records that the process server holds every record up to seq durably;
// files holding only such records are deleted.
func (s *Spool) Ack(seq uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if seq <= s.acked {
		return nil
	}
	if seq > s.shipSeq {
		return fmt.Errorf("ack of seq %d beyond the shippable %d", seq, s.shipSeq)
	}
	s.acked = seq
	for len(s.samples) > 0 && s.samples[0].seq <= seq {
		s.lastAckedTime = s.samples[0].time
		s.samples = s.samples[1:]
	}
	n := 0
	for n < len(s.mem) && s.mem[n].seq <= seq {
		l := int64(s.mem[n].n)
		s.memBytes -= l
		s.bytes -= l
		n++
	}
	s.mem = s.mem[n:]
	if len(s.mem) == 0 {
		s.mem = nil
		s.releaseRingLocked()
	}
	err := s.trimLocked()
	s.cond.Broadcast()
	return err
}

// ringKeep is the part of the memory log's ring kept in memory when the
// log empties (the steady state's depth), and ringReleaseEvery how often at
// most the pages past it that a backlog touched are given back.
const (
	ringKeep         = 4 << 20
	ringReleaseEvery = 5 * time.Second
)

// releaseRingLocked gives the ring's pages past ringKeep back to the
// system once the log is empty (appends start again at the ring's start),
// at most every ringReleaseEvery: the RSS then follows the backlog instead
// of keeping its peak, for the cost of a page fault per page the next
// backlog touches again.
func (s *Spool) releaseRingLocked() {
	if s.ringHigh <= ringKeep || len(s.mem) > 0 {
		return
	}
	now := time.Now()
	if now.Sub(s.ringReleased) < ringReleaseEvery {
		return
	}
	from := ringKeep &^ (os.Getpagesize() - 1)
	if from < len(s.ring) && releaseRing(s.ring[from:s.ringHigh]) == nil {
		s.ringHigh, s.ringReleased = from, now
	}
}

func (s *Spool) trimLocked() error {
	for len(s.files) > 1 && s.files[0].last <= s.acked {
		f := s.files[0]
		f.f.Close()
		if err := os.Remove(f.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		s.bytes -= f.size
		s.files = s.files[1:]
	}
	for len(s.marks) > 0 && s.marks[0].pos.File < s.files[0].first {
		s.marks = s.marks[1:]
	}
	return nil
}

// Acked returns the last acknowledged sequence number.
func (s *Spool) Acked() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.acked
}

// Next returns the sequence number the next Append will use.
func (s *Spool) Next() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.next
}

// First returns the first sequence number still held in the spool.
func (s *Spool) First() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.firstLocked()
}

func (s *Spool) firstLocked() uint64 {
	if f := s.files[0]; f.last >= f.first {
		return f.first
	}
	if len(s.mem) > 0 {
		return s.mem[0].seq
	}
	if s.batch != nil {
		return s.batch.first
	}
	return s.next
}

// Memory returns the bytes of the records held in memory (the memory log).
func (s *Spool) Memory() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.memBytes
}

// Pending returns the bytes held for records not yet acknowledged (an
// estimate at file granularity for the acknowledged part).
func (s *Spool) Pending() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.bytes
}

// Room returns how many more bytes Append takes without waiting for an
// acknowledgement.
func (s *Spool) Room() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return max(0, s.opts.MaxBytes-s.bytes)
}

// Fill returns Pending as a fraction of MaxBytes.
func (s *Spool) Fill() float64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return float64(s.bytes) / float64(s.opts.MaxBytes)
}

// Close writes the memory log's records to the files and closes them.
// Blocked Appends return ErrClosed.
func (s *Spool) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	s.cond.Broadcast()
	var err error
	if s.cutErr == nil {
		err = s.spillLocked(0)
	}
	for _, f := range s.files {
		if f.dirty {
			if serr := f.f.Sync(); serr != nil && err == nil {
				err = serr
			}
		}
	}
	s.closeFiles()
	if s.ring != nil {
		// Nothing reads the ring once closed (readMemory checks); what
		// a failed spill left in it is lost as in a kill, and the
		// activity log names its extents.
		s.bytes -= s.memBytes
		s.mem, s.memBytes = nil, 0
		if ferr := freeRing(s.ring); ferr != nil && err == nil {
			err = ferr
		}
		s.ring = nil
	}
	return err
}

func (s *Spool) closeFiles() {
	for _, f := range s.files {
		f.f.Close()
	}
}

// Reader reads shippable records in order. Each shipper connection makes one.
type Reader struct {
	s      *Spool
	pos    Position
	seq    uint64 // next seq to read
	f      *os.File
	size   int64 // size of f once known to be final, else -1
	inFile bool  // pos and f are at seq (else seq is found again first)
}

// NewReader returns a reader positioned at record seq, which must be in the
// spool (between First and the next seq to be given out).
func (s *Spool) NewReader(seq uint64) (*Reader, error) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil, ErrClosed
	}
	if seq < s.firstLocked() || seq > s.next {
		err := fmt.Errorf("spool holds seq %d..%d, not %d", s.firstLocked(), s.next-1, seq)
		s.mu.Unlock()
		return nil, err
	}
	inFiles := seq < s.fileNextLocked()
	s.mu.Unlock()
	r := &Reader{s: s, seq: seq, size: -1}
	if inFiles {
		if err := r.seek(); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// seek positions the reader at r.seq in the files: from the start of the
// file holding it, or from the last spill that began before it in that
// file, it walks the records' headers.
func (r *Reader) seek() error {
	s := r.s
	s.mu.Lock()
	var fi *file
	for _, f := range s.files {
		if f.first <= r.seq {
			fi = f
		}
	}
	if fi == nil {
		s.mu.Unlock()
		return fmt.Errorf("spool: no file holds seq %d", r.seq)
	}
	pos, seq := Position{File: fi.first, Offset: headerSize}, fi.first
	for _, m := range s.marks {
		if m.pos.File == fi.first && m.seq <= r.seq {
			pos, seq = m.pos, m.seq
		}
	}
	s.mu.Unlock()
	f, err := os.Open(fi.path)
	if err != nil {
		return err
	}
	// Skip records before r.seq by their headers.
	hdr := make([]byte, replication.RecordHeaderSize)
	for seq < r.seq {
		if _, err := f.ReadAt(hdr, pos.Offset); err != nil {
			f.Close()
			return fmt.Errorf("spool seek to seq %d: %w", r.seq, err)
		}
		h, err := peekHeader(hdr)
		if err != nil {
			f.Close()
			return err
		}
		pos.Offset += replication.RecordHeaderSize
		if h.Kind.HasData() {
			pos.Offset += int64(h.Length)
		}
		seq++
	}
	if r.f != nil {
		r.f.Close()
	}
	r.f, r.pos, r.size, r.inFile = f, pos, -1, true
	return nil
}

// Next appends encoded records to buf until about max bytes or the end of
// the shippable prefix, waiting up to wait for at least one record. It
// returns the grown buffer, the first sequence number and the record count
// (0 if nothing became shippable in time). Records are copied in bulk from
// the files, their headers walked (not decoded) to count them and check the
// sequence, or from the memory log.
func (r *Reader) Next(ctx context.Context, buf []byte, max int, wait time.Duration) ([]byte, uint64, uint32, error) {
	s := r.s
	s.mu.Lock()
	if s.shipSeq < r.seq && wait > 0 {
		wctx, cancel := context.WithTimeout(ctx, wait)
		for !s.closed && s.shipSeq < r.seq && wctx.Err() == nil {
			s.waitLocked(wctx)
		}
		cancel()
	}
	if s.closed {
		s.mu.Unlock()
		return buf, 0, 0, ErrClosed
	}
	endSeq := s.shipSeq
	s.mu.Unlock()
	first := r.seq
	var count uint32
	for r.seq <= endSeq && len(buf) < max {
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			return buf, first, count, ErrClosed
		}
		fileNext, end := s.fileNextLocked(), s.endPos()
		s.mu.Unlock()
		var n uint32
		var err error
		if r.seq < fileNext {
			if !r.inFile {
				if err := r.seek(); err != nil {
					return buf, first, count, err
				}
			}
			buf, n, err = r.readFiles(buf, max, min(endSeq, fileNext-1), end)
		} else {
			var spilled bool
			buf, n, spilled = r.readMemory(buf, max, endSeq)
			if spilled {
				continue // written to the files meanwhile: read there
			}
		}
		count += n
		if err != nil || n == 0 {
			return buf, first, count, err
		}
	}
	return buf, first, count, nil
}

// readMemory copies records r.seq..endSeq from the memory log. spilled
// reports that r.seq is no longer there (a spill moved it to the files).
func (r *Reader) readMemory(buf []byte, max int, endSeq uint64) ([]byte, uint32, bool) {
	s := r.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || len(s.mem) == 0 || s.mem[0].seq > r.seq {
		// (Closed: the ring is unmapped, and what it held was spilled
		// for the next reader of the files.)
		return buf, 0, true
	}
	r.inFile = false
	var n uint32
	for i := int(r.seq - s.mem[0].seq); i < len(s.mem) && r.seq <= endSeq; i++ {
		b := s.rec(s.mem[i])
		if len(buf)+len(b) > max && len(buf) > 0 {
			break // a frame may exceed max by one record, its first
		}
		buf = append(buf, b...)
		r.seq++
		n++
	}
	return buf, n, false
}

// readFiles copies records r.seq..endSeq from the files; end is the end
// of what was written to the last one.
func (r *Reader) readFiles(buf []byte, max int, endSeq uint64, end Position) ([]byte, uint32, error) {
	var count uint32
	for r.seq <= endSeq && len(buf) < max {
		limit := end.Offset
		if r.pos.File != end.File {
			// An older file than the last: it is complete and immutable.
			if r.size < 0 {
				st, err := r.f.Stat()
				if err != nil {
					return buf, count, err
				}
				r.size = st.Size()
			}
			if r.pos.Offset >= r.size {
				if err := r.advanceFile(); err != nil {
					return buf, count, err
				}
				continue
			}
			limit = r.size
		}
		n := limit - r.pos.Offset
		if room := int64(max - len(buf)); n > room {
			n = room
		}
		if n < replication.RecordHeaderSize {
			n = replication.RecordHeaderSize
		}
		at := len(buf)
		buf = append(buf, make([]byte, n)...)
		if _, err := r.f.ReadAt(buf[at:], r.pos.Offset); err != nil {
			return buf[:at], count, fmt.Errorf("spool read at seq %d: %w", r.seq, err)
		}
		// Walk whole records in what was read.
		p := at
		for p+replication.RecordHeaderSize <= len(buf) && r.seq <= endSeq {
			h, err := peekHeader(buf[p:])
			if err != nil {
				return buf[:p], count, fmt.Errorf("spool record seq %d: %w", r.seq, err)
			}
			if h.Seq != r.seq {
				return buf[:p], count, fmt.Errorf("spool: found seq %d, want %d: %w", h.Seq, r.seq, replication.ErrCorrupt)
			}
			rl := replication.RecordHeaderSize
			if h.Kind.HasData() {
				rl += int(h.Length)
			}
			if int64(rl) > limit-r.pos.Offset {
				return buf[:p], count, fmt.Errorf("spool record seq %d of %d bytes runs past the end of what was written: %w", r.seq, rl, replication.ErrCorrupt)
			}
			if p+rl > len(buf) {
				if p == at && at == 0 {
					// The batch's first record is larger than the room:
					// read it whole (a frame may exceed max by one record).
					buf = append(buf[:at], make([]byte, rl)...)
					if _, err := r.f.ReadAt(buf[at:], r.pos.Offset); err != nil {
						return buf[:at], count, fmt.Errorf("spool read at seq %d: %w", r.seq, err)
					}
					continue
				}
				break
			}
			p += rl
			r.pos.Offset += int64(rl)
			r.seq++
			count++
		}
		buf = buf[:p]
		if p == at {
			break
		}
	}
	return buf, count, nil
}

func (r *Reader) advanceFile() error {
	s := r.s
	s.mu.Lock()
	var nf *file
	for _, f := range s.files {
		if f.first == r.seq {
			nf = f
			break
		}
	}
	s.mu.Unlock()
	if nf == nil {
		return fmt.Errorf("spool: no file starts at seq %d", r.seq)
	}
	f, err := os.Open(nf.path)
	if err != nil {
		return err
	}
	r.f.Close()
	r.f = f
	r.size = -1
	r.pos = Position{File: nf.first, Offset: headerSize}
	return nil
}

// Close releases the reader.
func (r *Reader) Close() error {
	if r.f == nil {
		return nil
	}
	return r.f.Close()
}

// OldestPending returns the agent time (Unix ns) of the oldest record not
// yet acknowledged, to within sampleEvery, or 0 if none is pending.
func (s *Spool) OldestPending() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.acked+1 >= s.next {
		return 0
	}
	if len(s.samples) == 0 {
		return s.lastAckedTime
	}
	return s.samples[0].time
}

// Rebase drops every record and starts the sequence again at next, which
// must be beyond every record in the spool. An agent uses it after its
// machine went down hard: the server already holds records the spool lost
// with the page cache, and the agent continues after them.
func (s *Spool) Rebase(next uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if next < s.next || len(s.inflight) > 0 {
		return fmt.Errorf("spool rebase to %d: the spool holds records up to %d", next, s.next-1)
	}
	return s.restartLocked(next)
}

// Reset drops every record and numbers the next one next, which may be
// lower than the numbers the spool gave out: the agent starts a new log
// where the server's holdings end, and the dropped records are never sent.
// No record may be in flight (appended and not yet completed): the caller
// holds off every appender. A crash in the middle leaves either the old
// records, from the first one on, or none (then the spool starts again at
// the caller's acknowledged number), or the new empty log.
func (s *Spool) Reset(next uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}
	if next == 0 {
		return errors.New("spool reset to seq 0: sequence numbers start at 1")
	}
	if len(s.inflight) > 0 {
		return fmt.Errorf("spool reset to %d: %d records appended and not yet completed", next, len(s.inflight))
	}
	return s.restartLocked(next)
}

// restartLocked removes every file, newest first (so that a crash leaves a
// prefix of the log, never a tail that could pass for the new one), then
// starts an empty file at next.
func (s *Spool) restartLocked(next uint64) error {
	s.bytes -= s.memBytes
	s.mem, s.memBytes, s.marks = nil, 0, nil
	for i := len(s.files) - 1; i >= 0; i-- {
		f := s.files[i]
		if err := os.Remove(f.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			// What is left is a shorter spool, still the log's prefix:
			// keep using it as such.
			s.next = f.last + 1
			s.acked, s.shipSeq, s.synced = min(s.acked, f.last), min(s.shipSeq, f.last), min(s.synced, f.last)
			for len(s.samples) > 0 && s.samples[len(s.samples)-1].seq > f.last {
				s.samples = s.samples[:len(s.samples)-1]
			}
			return fmt.Errorf("spool: %w", err)
		}
		f.f.Close()
		s.bytes -= f.size
		s.files = s.files[:i]
	}
	if err := atomicfile.SyncDir(s.dir); err != nil {
		return fmt.Errorf("spool: %w", err)
	}
	s.files, s.bytes = nil, 0
	s.next, s.acked = next, next-1
	if err := s.newFile(next); err != nil {
		return err
	}
	s.shipSeq, s.synced = next-1, next-1
	s.samples = nil
	s.cond.Broadcast()
	return nil
}
