package localfs

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/diskcore"
	"github.com/asrdr/asr/replication/targettest"
)

func TestConformance(t *testing.T) {
	targettest.Run(t, func(t *testing.T, dir string) replication.Target {
		tg, err := Open(dir)
		if err != nil {
			t.Fatalf("Open(%s): %v", dir, err)
		}
		return tg
	})
}

// TestConformanceNoPunch runs the disk tests where holes cannot be punched.
func TestConformanceNoPunch(t *testing.T) {
	old := punch
	punch = func(*os.File, int64, int64) error { return errors.New("no holes here") }
	t.Cleanup(func() { punch = old })
	targettest.Run(t, func(t *testing.T, dir string) replication.Target {
		tg, err := Open(dir)
		if err != nil {
			t.Fatalf("Open(%s): %v", dir, err)
		}
		return tg
	})
}

// ----- test hooks -----

// tdisk is a handle on a replica disk with its storage, for the hooks.
type tdisk struct {
	replication.ReplicaDisk
	d *disk
}

func newTDisk(rd replication.ReplicaDisk) *tdisk {
	return &tdisk{rd, diskcore.StorageOf(rd).(*disk)}
}

// syncLogs fsyncs the snapshot logs without applying the queue: the first
// half of a Flush.
func (h *tdisk) syncLogs() error { return h.d.syncLogs() }

// applySome applies the first k queued changes without fsync, as a crash in
// the middle of a Flush would leave them.
func (h *tdisk) applySome(k int) error {
	return h.d.applyLocked(min(k, len(h.d.ops)), false)
}

// newestSynced returns the path and the durable length of the newest log.
func (h *tdisk) newestSynced() (string, int64) {
	e := h.d.chain[len(h.d.chain)-1]
	return e.path, recordOffset(e.synced)
}

func (h *tdisk) queued() int { return len(h.d.ops) }

// crash returns a copy of tg's directory as a process that died now would
// leave it: what it wrote is there, synced or not; what it queued is lost.
// paths are moved into the copy. tg goes on, over the original.
func crash(t *testing.T, tg *Target, paths ...*string) string {
	t.Helper()
	dir := t.TempDir()
	if err := os.CopyFS(dir, os.DirFS(tg.Dir())); err != nil {
		t.Fatal(err)
	}
	for _, p := range paths {
		rel, err := filepath.Rel(tg.Dir(), *p)
		if err != nil {
			t.Fatal(err)
		}
		*p = filepath.Join(dir, rel)
	}
	return dir
}

// withBufferLimit lowers the bound of queued changes for the targets opened
// until the test ends.
func withBufferLimit(t testing.TB, n int64) {
	old := bufferLimit
	bufferLimit = n
	t.Cleanup(func() { bufferLimit = old })
}

// ----- helpers -----

func mustOpen(t testing.TB, dir string) *Target {
	t.Helper()
	tg, err := Open(dir)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { tg.Close() })
	return tg
}

func mustDisk(t testing.TB, tg *Target, key string, size int64) *tdisk {
	t.Helper()
	d, err := tg.OpenDisk(t.Context(), key, size)
	if err != nil {
		t.Fatalf("OpenDisk(%s): %v", key, err)
	}
	return newTDisk(d)
}

// change is a recorded WriteAt (data != nil) or ZeroAt, to replay.
type change struct {
	off, n int64
	data   []byte
}

func (c change) apply(t testing.TB, d *tdisk, model []byte) {
	t.Helper()
	var err error
	if c.data != nil {
		err = d.WriteAt(c.data, c.off)
		copy(model[c.off:], c.data)
	} else {
		err = d.ZeroAt(c.off, c.n)
		clear(model[c.off : c.off+c.n])
	}
	if err != nil {
		t.Fatalf("apply change at %d+%d: %v", c.off, c.n, err)
	}
}

func randChanges(rng *rand.Rand, size int64, count int) []change {
	var cs []change
	for range count {
		off := rng.Int64N(size)
		if rng.IntN(2) == 0 {
			off = rng.Int64N(min(size, 48<<10)) // a hot area, for overlaps
		}
		n := 1 + rng.Int64N(min(size-off, 3*blockSize+50))
		if rng.IntN(5) == 0 {
			cs = append(cs, change{off: off, n: n})
			continue
		}
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		cs = append(cs, change{off: off, n: n, data: p})
	}
	return cs
}

func snapshotBytes(t testing.TB, d *tdisk, name string) []byte {
	t.Helper()
	r, err := d.OpenSnapshot(t.Context(), name)
	if err != nil {
		t.Fatalf("OpenSnapshot(%s): %v", name, err)
	}
	defer r.Close()
	b := make([]byte, r.Size())
	if _, err := r.ReadAt(b, 0); err != nil && err != io.EOF {
		t.Fatalf("read snapshot %s: %v", name, err)
	}
	return b
}

func checkSnap(t testing.TB, d *tdisk, name string, want []byte) {
	t.Helper()
	got := snapshotBytes(t, d, name)
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && got[i] == want[i] {
			i++
		}
		t.Fatalf("snapshot %s differs from the model at byte %d (block %d)", name, i, i/blockSize)
	}
}

func mustFlushSnap(t testing.TB, d *tdisk, name string) {
	t.Helper()
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	if err := d.Snapshot(t.Context(), name); err != nil {
		t.Fatal(err)
	}
}

// ----- crash safety -----

// TestCrashReplay crashes in the middle of a Flush, after the logs are durable
// and with any number of the queued changes applied, reopens, replays the
// changes as the applier does from its checkpoint, and checks every snapshot.
func TestCrashReplay(t *testing.T) {
	const size = 512<<10 + 700
	for _, k := range []int{0, 1, 5, 17, 40} {
		for _, tornExtra := range []bool{false, true} {
			t.Run(fmt.Sprintf("applied%d/torn%v", k, tornExtra), func(t *testing.T) {
				rng := rand.New(rand.NewPCG(uint64(k), 1))
				dir := t.TempDir()
				tg := mustOpen(t, dir)
				d := mustDisk(t, tg, "m/d", size)
				model := make([]byte, size)
				snaps := map[string][]byte{}
				for i, name := range []string{"s1", "s2"} {
					for _, c := range randChanges(rng, size, 20+i) {
						c.apply(t, d, model)
					}
					mustFlushSnap(t, d, name)
					snaps[name] = slices.Clone(model)
				}
				// The batch after the checkpoint (snapshot s2).
				batch := randChanges(rng, size, 40)
				replay := make([]byte, size)
				copy(replay, model)
				for _, c := range batch {
					c.apply(t, d, replay)
				}
				if err := d.syncLogs(); err != nil {
					t.Fatal(err)
				}
				if err := d.applySome(k); err != nil {
					t.Fatal(err)
				}
				path, synced := d.newestSynced()
				if tornExtra {
					// Saves after the fsync that never became durable, the
					// last one torn.
					for _, c := range randChanges(rng, size, 10) {
						c.apply(t, d, make([]byte, size))
					}
				}
				dir = crash(t, tg, &path)
				if tornExtra {
					if err := os.Truncate(path, synced+recSize/3); err != nil {
						t.Fatal(err)
					}
				}
				tg.Close()

				tg = mustOpen(t, dir)
				d = mustDisk(t, tg, "m/d", 0)
				// Before any replay, the snapshots are intact...
				for name, want := range snaps {
					checkSnap(t, d, name, want)
				}
				if st, err := os.Stat(path); err != nil || (st.Size()-cowHeaderSize)%recSize != 0 {
					t.Fatalf("log not truncated to whole records: %v, %v", st, err)
				}
				// ...and replaying the batch gives the right disk.
				for _, c := range batch {
					c.apply(t, d, model)
				}
				if !bytes.Equal(model, replay) {
					t.Fatal("model replay differs") // a bug in the test
				}
				mustFlushSnap(t, d, "s3")
				snaps["s3"] = slices.Clone(model)
				for name, want := range snaps {
					checkSnap(t, d, name, want)
				}
				// The same again, through another crash at the same place.
				if err := d.Close(); err != nil {
					t.Fatal(err)
				}
				tg.Close()
				tg = mustOpen(t, dir)
				d = mustDisk(t, tg, "m/d", 0)
				for name, want := range snaps {
					checkSnap(t, d, name, want)
				}
				d.Close()
			})
		}
	}
}

// TestCrashBeforeFlush loses a whole queue and its unsynced saves.
func TestCrashBeforeFlush(t *testing.T) {
	const size = 256 << 10
	dir := t.TempDir()
	tg := mustOpen(t, dir)
	d := mustDisk(t, tg, "d", size)
	rng := rand.New(rand.NewPCG(9, 9))
	model := make([]byte, size)
	for _, c := range randChanges(rng, size, 30) {
		c.apply(t, d, model)
	}
	mustFlushSnap(t, d, "s1")
	for _, c := range randChanges(rng, size, 30) {
		c.apply(t, d, make([]byte, size))
	}
	dir = crash(t, tg)
	tg.Close()
	tg = mustOpen(t, dir)
	d = mustDisk(t, tg, "d", 0)
	checkSnap(t, d, "s1", model)
	mustFlushSnap(t, d, "s2")
	checkSnap(t, d, "s2", model)
}

// ----- the COW files -----

// corrupt flips a byte of a file.
func corrupt(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0x40
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// tailSetup leaves a log with n records of which the header commits c: a
// flushed batch, then a batch whose saves were synced by a Flush that never
// applied it, and no clean close.
func tailSetup(t *testing.T) (dir, path string, model []byte, n, c int64) {
	const size = 128 << 10
	dir = t.TempDir()
	tg := mustOpen(t, dir)
	d := mustDisk(t, tg, "d", size)
	model = make([]byte, size)
	for b := range int64(8) {
		change{off: b * blockSize, n: 10, data: bytes.Repeat([]byte{byte(b + 1)}, 10)}.apply(t, d, model)
	}
	mustFlushSnap(t, d, "s1")
	snap := slices.Clone(model)
	for b := range int64(4) { // saves 4 records, applied
		change{off: b * blockSize, n: 1, data: []byte{0xEE}}.apply(t, d, model)
	}
	if err := d.Flush(t.Context()); err != nil { // header commits 0, 4 durable
		t.Fatal(err)
	}
	for b := int64(4); b < 8; b++ { // 4 more saves, synced, never applied
		change{off: b * blockSize, n: 1, data: []byte{0xDD}}.apply(t, d, make([]byte, size))
	}
	if err := d.syncLogs(); err != nil { // header commits 4, 8 durable
		t.Fatal(err)
	}
	path, _ = d.newestSynced()
	dir = crash(t, tg, &path)
	tg.Close()
	return dir, path, snap, 8, 4
}

func reopenDisk(t *testing.T, dir string) (*Target, *tdisk, error) {
	tg := mustOpen(t, dir)
	d, err := tg.OpenDisk(t.Context(), "d", 0)
	if err != nil {
		return tg, nil, err
	}
	return tg, newTDisk(d), nil
}

func TestTornTail(t *testing.T) {
	tests := []struct {
		name    string
		damage  func(t *testing.T, path string)
		records int64 // kept
	}{
		{"intact", func(*testing.T, string) {}, 8},
		{"last record", func(t *testing.T, path string) { corrupt(t, path, recordOffset(7)+100) }, 7},
		{"first uncommitted", func(t *testing.T, path string) { corrupt(t, path, recordOffset(4)+recHeaderSize) }, 4},
		{"block index", func(t *testing.T, path string) { corrupt(t, path, recordOffset(6)) }, 6},
		{"partial record", func(t *testing.T, path string) {
			f, _ := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
			f.Write(bytes.Repeat([]byte{1}, recSize/2))
			f.Close()
		}, 8},
		{"truncated mid-record", func(t *testing.T, path string) { os.Truncate(path, recordOffset(6)+17) }, 6},
		{"zeroed tail", func(t *testing.T, path string) {
			f, _ := os.OpenFile(path, os.O_WRONLY, 0)
			f.WriteAt(make([]byte, 2*recSize), recordOffset(5))
			f.Close()
		}, 5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir, path, snap, _, _ := tailSetup(t)
			tt.damage(t, path)
			tg, d, err := reopenDisk(t, dir)
			if err != nil {
				t.Fatalf("OpenDisk: %v", err)
			}
			st, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if got := (st.Size() - cowHeaderSize) / recSize; got != tt.records || (st.Size()-cowHeaderSize)%recSize != 0 {
				t.Fatalf("log has %d bytes (%d records), want %d records", st.Size(), got, tt.records)
			}
			checkSnap(t, d, "s1", snap)
			d.Close()
			tg.Close()
		})
	}
}

func TestCorruptionDetected(t *testing.T) {
	// Damage that makes a log unreadable fails the open.
	tests := []struct {
		name   string
		damage func(t *testing.T, path string)
	}{
		{"header", func(t *testing.T, path string) { corrupt(t, path, 20) }},
		{"magic", func(t *testing.T, path string) { corrupt(t, path, 0) }},
		{"committed records cut off", func(t *testing.T, path string) { os.Truncate(path, recordOffset(3)) }},
		{"header cut off", func(t *testing.T, path string) { os.Truncate(path, 10) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir, path, _, _, _ := tailSetup(t)
			tt.damage(t, path)
			tg, d, err := reopenDisk(t, dir)
			if !errors.Is(err, replication.ErrCorrupt) {
				t.Fatalf("OpenDisk = %v, want ErrCorrupt", err)
			}
			_ = d
			tg.Close()
		})
	}
	// A committed record damaged since it was written (bit rot) costs its
	// block, not the disk: the disk opens, reading that block of the
	// snapshot fails, the other blocks read as they were.
	blocks := []struct {
		name   string
		damage func(t *testing.T, path string)
		block  int64
	}{
		{"committed record data", func(t *testing.T, path string) { corrupt(t, path, recordOffset(1)+2000) }, 1},
		{"committed record crc", func(t *testing.T, path string) { corrupt(t, path, recordOffset(3)+8) }, 3},
		{"committed record reserved", func(t *testing.T, path string) { corrupt(t, path, recordOffset(0)+13) }, 0},
	}
	for _, tt := range blocks {
		t.Run(tt.name, func(t *testing.T) {
			dir, path, snap, _, _ := tailSetup(t)
			tt.damage(t, path)
			tg, d, err := reopenDisk(t, dir)
			if err != nil {
				t.Fatalf("OpenDisk: %v", err)
			}
			defer tg.Close()
			defer d.Close()
			checkDamagedBlock(t, d, "s1", snap, tt.block)
		})
	}
	t.Run("clean close", func(t *testing.T) {
		dir := t.TempDir()
		tg := mustOpen(t, dir)
		d := mustDisk(t, tg, "d", 64<<10)
		model := make([]byte, 64<<10)
		mustFlushSnap(t, d, "s1")
		snap := slices.Clone(model)
		change{off: 0, n: 3 * blockSize, data: bytes.Repeat([]byte{9}, 3*blockSize)}.apply(t, d, model)
		path, _ := d.newestSynced()
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		tg.Close()
		corrupt(t, path, recordOffset(2)+50) // the last record: committed at the clean close
		tg, d2, err := reopenDisk(t, dir)
		if err != nil {
			t.Fatalf("OpenDisk: %v", err)
		}
		defer tg.Close()
		defer d2.Close()
		checkDamagedBlock(t, d2, "s1", snap, 2)
	})
	// Deleting a snapshot merges its damaged record as it is: the older
	// snapshot's read of the block fails too, and the delete succeeds.
	t.Run("merge", func(t *testing.T) {
		dir := t.TempDir()
		tg := mustOpen(t, dir)
		defer tg.Close()
		d := mustDisk(t, tg, "d", 64<<10)
		defer d.Close()
		model := make([]byte, 64<<10)
		mustFlushSnap(t, d, "s0")
		s0 := slices.Clone(model)
		mustFlushSnap(t, d, "s1")
		change{off: blockSize, n: blockSize, data: bytes.Repeat([]byte{7}, blockSize)}.apply(t, d, model)
		if err := d.Flush(t.Context()); err != nil {
			t.Fatal(err)
		}
		path, _ := d.newestSynced()
		corrupt(t, path, recordOffset(0)+recHeaderSize+5)
		if err := d.DeleteSnapshot(t.Context(), "s1"); err != nil {
			t.Fatalf("DeleteSnapshot over a damaged record: %v", err)
		}
		checkDamagedBlock(t, d, "s0", s0, 1)
	})
	// Damage after open shows in reads.
	t.Run("read", func(t *testing.T) {
		dir := t.TempDir()
		tg := mustOpen(t, dir)
		d := mustDisk(t, tg, "d", 64<<10)
		mustFlushSnap(t, d, "s1")
		change{off: 0, n: blockSize, data: bytes.Repeat([]byte{9}, blockSize)}.apply(t, d, make([]byte, 64<<10))
		if err := d.Flush(t.Context()); err != nil {
			t.Fatal(err)
		}
		path, _ := d.newestSynced()
		corrupt(t, path, recordOffset(0)+99)
		r, err := d.OpenSnapshot(t.Context(), "s1")
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		if _, err := r.ReadAt(make([]byte, 100), 0); !errors.Is(err, replication.ErrCorrupt) {
			t.Fatalf("ReadAt = %v, want ErrCorrupt", err)
		}
		if _, err := r.ReadAt(make([]byte, 100), blockSize); err != nil {
			t.Fatalf("ReadAt of an undamaged block: %v", err)
		}
	})
}

// ----- deletion -----

func snapFiles(t *testing.T, tg *Target, key string) []string {
	t.Helper()
	es, err := os.ReadDir(filepath.Join(tg.diskDir(key), snapDirName))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

func TestDeleteReclaims(t *testing.T) {
	const size = 256 << 10
	dir := t.TempDir()
	tg := mustOpen(t, dir)
	d := mustDisk(t, tg, "d", size)
	model := make([]byte, size)
	snaps := map[string][]byte{}
	rng := rand.New(rand.NewPCG(3, 3))
	for _, name := range []string{"s1", "s2", "s3"} {
		for _, c := range randChanges(rng, size, 15) {
			c.apply(t, d, model)
		}
		mustFlushSnap(t, d, name)
		snaps[name] = slices.Clone(model)
	}
	for _, c := range randChanges(rng, size, 15) {
		c.apply(t, d, model)
	}
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := snapFiles(t, tg, "d"); !slices.Equal(got, []string{"s1.cow", "s2.cow", "s3.cow"}) {
		t.Fatalf("snap dir: %q", got)
	}
	if err := d.DeleteSnapshot(t.Context(), "s1"); err != nil {
		t.Fatal(err)
	}
	if got := snapFiles(t, tg, "d"); !slices.Equal(got, []string{"s2.cow", "s3.cow"}) {
		t.Fatalf("snap dir after deleting s1: %q", got)
	}
	s2Size := fileSize(t, filepath.Join(tg.diskDir("d"), snapDirName, "s2.cow"))

	// A reader defers the deletion of s3 (into s2) until it closes.
	r, err := d.OpenSnapshot(t.Context(), "s3")
	if err != nil {
		t.Fatal(err)
	}
	if err := d.DeleteSnapshot(t.Context(), "s3"); err != nil {
		t.Fatal(err)
	}
	if got := snapFiles(t, tg, "d"); !slices.Equal(got, []string{"0000000000000003.deleted", "s2.cow"}) {
		t.Fatalf("snap dir with s3 deleted but held: %q", got)
	}
	got := make([]byte, size)
	if _, err := r.ReadAt(got, 0); err != nil || !bytes.Equal(got, snaps["s3"]) {
		t.Fatalf("held reader of s3: %v, equal %v", err, bytes.Equal(got, snaps["s3"]))
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if got := snapFiles(t, tg, "d"); !slices.Equal(got, []string{"s2.cow"}) {
		t.Fatalf("snap dir after the reader closed: %q", got)
	}
	if fileSize(t, filepath.Join(tg.diskDir("d"), snapDirName, "s2.cow")) <= s2Size {
		t.Fatalf("s3's blocks were not merged into s2")
	}
	checkSnap(t, d, "s2", snaps["s2"])
	if err := d.DeleteSnapshot(t.Context(), "s2"); err != nil {
		t.Fatal(err)
	}
	if got := snapFiles(t, tg, "d"); len(got) != 0 {
		t.Fatalf("snap dir after deleting everything: %q", got)
	}
	d.Close()
}

func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Size()
}

// TestDeferredDeleteSurvivesCrash crashes while a deleted snapshot waits for
// its reader: the deletion holds, and the next open merges it away.
func TestDeferredDeleteSurvivesCrash(t *testing.T) {
	const size = 128 << 10
	dir := t.TempDir()
	tg := mustOpen(t, dir)
	d := mustDisk(t, tg, "d", size)
	model := make([]byte, size)
	snaps := map[string][]byte{}
	rng := rand.New(rand.NewPCG(4, 4))
	for _, name := range []string{"s1", "s2", "s3"} {
		for _, c := range randChanges(rng, size, 15) {
			c.apply(t, d, model)
		}
		mustFlushSnap(t, d, name)
		snaps[name] = slices.Clone(model)
	}
	for _, c := range randChanges(rng, size, 15) {
		c.apply(t, d, model)
	}
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	if _, err := d.OpenSnapshot(t.Context(), "s2"); err != nil {
		t.Fatal(err)
	}
	if err := d.DeleteSnapshot(t.Context(), "s2"); err != nil {
		t.Fatal(err)
	}
	dir = crash(t, tg)
	tg.Close()

	tg = mustOpen(t, dir)
	d = mustDisk(t, tg, "d", 0)
	if got := snapFiles(t, tg, "d"); !slices.Equal(got, []string{"s1.cow", "s3.cow"}) {
		t.Fatalf("snap dir after reopen: %q", got)
	}
	names, _ := d.Snapshots(t.Context())
	if !slices.Equal(names, []string{"s1", "s3"}) {
		t.Fatalf("Snapshots() = %q", names)
	}
	checkSnap(t, d, "s1", snaps["s1"])
	checkSnap(t, d, "s3", snaps["s3"])
	d.Close()
}

// TestSnapshotAfterDeletedNewest takes a snapshot whose name sorts before a
// deleted one that a reader still holds: chain order is creation order.
func TestSnapshotAfterDeletedNewest(t *testing.T) {
	const size = 64 << 10
	tg := mustOpen(t, t.TempDir())
	d := mustDisk(t, tg, "d", size)
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(5, 5))
	snaps := map[string][]byte{}
	take := func(name string) {
		for _, c := range randChanges(rng, size, 10) {
			c.apply(t, d, model)
		}
		mustFlushSnap(t, d, name)
		snaps[name] = slices.Clone(model)
	}
	take("s1")
	take("s3")
	r, err := d.OpenSnapshot(t.Context(), "s3")
	if err != nil {
		t.Fatal(err)
	}
	if err := d.DeleteSnapshot(t.Context(), "s3"); err != nil {
		t.Fatal(err)
	}
	take("s2")
	take("s25")
	got := make([]byte, size)
	if _, err := r.ReadAt(got, 0); err != nil || !bytes.Equal(got, snaps["s3"]) {
		t.Fatalf("held reader of s3: %v", err)
	}
	r.Close()
	for _, n := range []string{"s1", "s2", "s25"} {
		checkSnap(t, d, n, snaps[n])
	}
	if err := d.Snapshot(t.Context(), "s21"); !errors.Is(err, replication.ErrSnapshotOrder) {
		t.Fatalf("Snapshot(s21) = %v, want ErrSnapshotOrder", err)
	}
	d.Close()
}

// ----- the rest -----

func TestSparse(t *testing.T) {
	tg := mustOpen(t, t.TempDir())
	d := mustDisk(t, tg, "big", 1<<30)
	defer d.Close()
	path := filepath.Join(tg.diskDir("big"), replicaName)
	if used := blocksUsed(t, path); used > 1<<20 {
		t.Fatalf("a new 1 GiB disk uses %d bytes", used)
	}
	if err := d.WriteAt(bytes.Repeat([]byte{1}, 4<<20), 512<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	full := blocksUsed(t, path)
	if full < 4<<20 || full > 6<<20 {
		t.Fatalf("4 MiB written, %d bytes used", full)
	}
	if err := d.ZeroAt(512<<20, 4<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	if used := blocksUsed(t, path); used > 1<<20 {
		// The local target relies on punched holes to keep zeroed
		// ranges free (ext4, xfs, tmpfs all punch): a file system that
		// cannot is not one to keep replicas on, and this fails.
		t.Fatalf("ZeroAt left %d bytes allocated: the file system did not punch the hole", used)
	}
}

// TestUnchangedNotSaved checks that changes leaving blocks as they are save
// nothing: zeroing holes, writing zeros into them, rewriting what is there.
func TestUnchangedNotSaved(t *testing.T) {
	const size = 8 << 20
	tg := mustOpen(t, t.TempDir())
	d := mustDisk(t, tg, "d", size)
	defer d.Close()
	data := bytes.Repeat([]byte{5}, 64<<10)
	if err := d.WriteAt(data, 1<<20); err != nil {
		t.Fatal(err)
	}
	mustFlushSnap(t, d, "s1")
	path, _ := d.newestSynced()
	if err := d.ZeroAt(0, size/2); err != nil { // all but 64 KiB are holes
		t.Fatal(err)
	}
	if n := d.d.chain[0].count; n != 16 {
		t.Fatalf("ZeroAt over 64 KiB of data and holes saved %d blocks, want 16", n)
	}
	if err := d.WriteAt(make([]byte, 1<<20), size/2); err != nil {
		t.Fatal(err)
	}
	if err := d.WriteAt(bytes.Repeat([]byte{5}, 100), 1<<20+5); err != nil { // saved already
		t.Fatal(err)
	}
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	if got := fileSize(t, path); got != recordOffset(16) {
		t.Fatalf("log is %d bytes, want %d", got, recordOffset(16))
	}
	mustFlushSnap(t, d, "s2")
	if err := d.WriteAt(bytes.Repeat([]byte{5}, 100), 3<<20); err != nil { // a hole: changes
		t.Fatal(err)
	}
	if err := d.WriteAt(make([]byte, 100), 3<<20+blockSize); err != nil { // a hole: zeros, no change
		t.Fatal(err)
	}
	if n := d.d.chain[1].count; n != 1 {
		t.Fatalf("saved %d blocks, want 1", n)
	}
	want := make([]byte, size)
	copy(want[1<<20:], data)
	checkSnap(t, d, "s1", want)
	want2 := make([]byte, size)
	copy(want2[1<<20+5:], bytes.Repeat([]byte{5}, 100))
	checkSnap(t, d, "s2", want2)
}

func TestSnapshotFlushes(t *testing.T) {
	tg := mustOpen(t, t.TempDir())
	d := mustDisk(t, tg, "d", 64<<10)
	defer d.Close()
	if err := d.WriteAt([]byte("unflushed"), 100); err != nil {
		t.Fatal(err)
	}
	if err := d.Snapshot(t.Context(), "s"); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, 64<<10)
	copy(want[100:], "unflushed")
	checkSnap(t, d, "s", want)
}

func TestBufferLimit(t *testing.T) {
	const size = 1 << 20
	withBufferLimit(t, 64<<10)
	tg := mustOpen(t, t.TempDir())
	d := mustDisk(t, tg, "d", size)
	defer d.Close()
	model := make([]byte, size)
	rng := rand.New(rand.NewPCG(6, 6))
	mustFlushSnap(t, d, "s0")
	for i := range 200 {
		for _, c := range randChanges(rng, size, 1) {
			c.apply(t, d, model)
		}
		if q := d.queued(); q > 64 {
			t.Fatalf("%d changes queued after %d, past the limit", q, i)
		}
	}
	mustFlushSnap(t, d, "s1")
	checkSnap(t, d, "s0", make([]byte, size))
	checkSnap(t, d, "s1", model)
}

func TestLocked(t *testing.T) {
	dir := t.TempDir()
	tg, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Open(dir); !errors.Is(err, replication.ErrLocked) {
		t.Fatalf("second Open = %v, want ErrLocked", err)
	}
	if err := tg.Close(); err != nil {
		t.Fatal(err)
	}
	tg = mustOpen(t, dir)
	if tg.Dir() != dir || tg.String() != "localfs:"+dir {
		t.Fatalf("Dir() = %q, String() = %q", tg.Dir(), tg.String())
	}
}

func TestClosed(t *testing.T) {
	tg := mustOpen(t, t.TempDir())
	d := mustDisk(t, tg, "d", 8192)
	mustFlushSnap(t, d, "s")
	r, err := d.OpenSnapshot(t.Context(), "s")
	if err != nil {
		t.Fatal(err)
	}
	if err := tg.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.ReadAt(make([]byte, 10), 0); !errors.Is(err, replication.ErrClosed) {
		t.Fatalf("ReadAt after the target closed = %v", err)
	}
	if err := d.WriteAt([]byte{1}, 0); !errors.Is(err, replication.ErrClosed) {
		t.Fatalf("WriteAt after the target closed = %v", err)
	}
	if err := tg.PutObject(t.Context(), "k", nil); !errors.Is(err, replication.ErrClosed) {
		t.Fatalf("PutObject after Close = %v", err)
	}
	if r.Size() != 8192 {
		t.Fatal("Size() after Close")
	}
	r.Close()
	d.Close()
}

// TestSharedDisk opens a disk twice, as the applier and a recovery do.
func TestSharedDisk(t *testing.T) {
	tg := mustOpen(t, t.TempDir())
	w := mustDisk(t, tg, "d", 64<<10)
	r := mustDisk(t, tg, "d", 0)
	if err := w.WriteAt([]byte("x"), 0); err != nil {
		t.Fatal(err)
	}
	mustFlushSnap(t, w, "s1")
	want := make([]byte, 64<<10)
	want[0] = 'x'
	checkSnap(t, r, "s1", want)
	if err := tg.DeleteDisk(t.Context(), "d"); !errors.Is(err, replication.ErrDiskOpen) {
		t.Fatalf("DeleteDisk of an open disk = %v", err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.WriteAt([]byte("y"), 0); !errors.Is(err, replication.ErrClosed) {
		t.Fatalf("WriteAt on a closed handle = %v", err)
	}
	checkSnap(t, r, "s1", want)
	if _, err := tg.OpenDisk(t.Context(), "d", 128<<10); err == nil {
		t.Fatal("OpenDisk of an open disk with another size accepted")
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := tg.DeleteDisk(t.Context(), "d"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tg.diskDir("d")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("disk directory left behind: %v", err)
	}
}

func TestFormatFile(t *testing.T) {
	dir := t.TempDir()
	tg := mustOpen(t, dir)
	tg.Close()
	corrupt(t, filepath.Join(dir, formatFile), 7) // the version
	if _, err := Open(dir); !errors.Is(err, replication.ErrCorrupt) {
		t.Fatalf("Open with a damaged layout file = %v", err)
	}
}

func TestStrayFilesIgnored(t *testing.T) {
	dir := t.TempDir()
	tg := mustOpen(t, dir)
	if err := tg.PutObject(t.Context(), "a/b", []byte("x")); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, objectsDir, "a", "b~tmp-123"), []byte("junk"), 0o644)
	l, err := tg.ListObjects(t.Context(), "")
	if err != nil || len(l) != 1 || l[0].Key != "a/b" {
		t.Fatalf("ListObjects = %+v, %v", l, err)
	}
	d := mustDisk(t, tg, "d", 8192)
	mustFlushSnap(t, d, "s")
	d.Close()
	snap := filepath.Join(tg.diskDir("d"), snapDirName)
	os.WriteFile(filepath.Join(snap, "t.cow~tmp"), []byte("half made"), 0o644)
	os.WriteFile(filepath.Join(snap, "README"), []byte("?"), 0o644)
	d = mustDisk(t, tg, "d", 0)
	names, _ := d.Snapshots(t.Context())
	if !slices.Equal(names, []string{"s"}) {
		t.Fatalf("Snapshots() = %q", names)
	}
	if _, err := os.Stat(filepath.Join(snap, "t.cow~tmp")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("temporary log left: %v", err)
	}
	d.Close()
}

func TestCheckPrefix(t *testing.T) {
	for _, p := range []string{"", "a", "a/", "a/b", "a/b/", "a/.", "a/..", ".", "..", "a-"} {
		if err := checkPrefix(p); err != nil {
			t.Errorf("checkPrefix(%q) = %v", p, err)
		}
	}
	for _, p := range []string{"/", "/a", "a//", "../", "./", "a/../b", "a b", "a/ä"} {
		if err := checkPrefix(p); err == nil {
			t.Errorf("checkPrefix(%q) accepted", p)
		}
	}
}

// TestTrimLargeSparse zeroes a whole, mostly empty 64 GiB disk with a snapshot
// to save into: only the blocks holding data are read and saved.
func TestTrimLargeSparse(t *testing.T) {
	const size = 64 << 30
	tg := mustOpen(t, t.TempDir())
	d := mustDisk(t, tg, "d", size)
	defer d.Close()
	offs := []int64{0, 7 << 30, size - 100}
	for _, off := range offs {
		if err := d.WriteAt([]byte("data"), off); err != nil {
			t.Fatal(err)
		}
	}
	mustFlushSnap(t, d, "s1")
	start := time.Now()
	if err := d.ZeroAt(0, size); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	if n := d.d.chain[0].count; n != int64(len(offs)) {
		t.Fatalf("saved %d blocks, want %d", n, len(offs))
	}
	t.Logf("zeroed 64 GiB in %v", time.Since(start))
	r, err := d.OpenSnapshot(t.Context(), "s1")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	buf := make([]byte, 4)
	for _, off := range offs {
		if _, err := r.ReadAt(buf, off); err != nil || string(buf) != "data" {
			t.Fatalf("s1 at %d = %q, %v", off, buf, err)
		}
	}
}

// checkDamagedBlock checks that reading block b of snapshot name fails with
// ErrCorrupt while every other block reads as in model.
func checkDamagedBlock(t *testing.T, d *tdisk, name string, model []byte, b int64) {
	t.Helper()
	r, err := d.OpenSnapshot(t.Context(), name)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	buf := make([]byte, blockSize)
	for blk := int64(0); blk*blockSize < int64(len(model)); blk++ {
		_, err := r.ReadAt(buf, blk*blockSize)
		switch {
		case blk == b && !errors.Is(err, replication.ErrCorrupt):
			t.Fatalf("block %d (damaged): ReadAt = %v, want ErrCorrupt", blk, err)
		case blk != b && err != nil:
			t.Fatalf("block %d: ReadAt: %v", blk, err)
		case blk != b && !bytes.Equal(buf, model[blk*blockSize:(blk+1)*blockSize]):
			t.Fatalf("block %d reads other data than the snapshot held", blk)
		}
	}
}

// TestWriteAtOwnedTakesTheBytes: WriteAt queues a copy of what it is
// given (the caller may reuse its buffer), WriteAtOwned the caller's bytes
// themselves (the applier's decoded records: no copy of every byte
// applied); both read back and flush as written.
func TestWriteAtOwnedTakesTheBytes(t *testing.T) {
	tg := mustOpen(t, t.TempDir())
	d := mustDisk(t, tg, "m/d0", 1<<20)
	copied := bytes.Repeat([]byte{1}, 8192)
	owned := bytes.Repeat([]byte{2}, 8192)
	if err := d.WriteAt(copied, 0); err != nil {
		t.Fatal(err)
	}
	ow, ok := d.ReplicaDisk.(replication.OwningWriter)
	if !ok {
		t.Fatal("a localfs replica disk is not a replication.OwningWriter")
	}
	if err := ow.WriteAtOwned(owned, 65536); err != nil {
		t.Fatal(err)
	}
	if n := d.queued(); n != 2 {
		t.Fatalf("%d changes queued, want 2", n)
	}
	if q := d.d.ops; &q[0].data[0] == &copied[0] || &q[1].data[0] != &owned[0] {
		t.Fatal("WriteAt must queue a copy and WriteAtOwned the bytes given")
	}
	if err := d.Flush(t.Context()); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	for off, want := range map[int64][]byte{0: copied, 65536: owned} {
		if _, err := d.ReadAt(got, off); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("at %d: %v, %x...", off, err, got[:4])
		}
	}
}
