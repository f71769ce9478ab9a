package procserver

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
)

// machineOf returns the process server's open machine.
func machineOf(t *testing.T, s *Server) *machine {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.machines[machineID]
	if !ok {
		t.Fatal("the machine is not open")
	}
	return m
}

// waitHandoffEmpty waits until no decoded frame is held or lent (every
// segment applied and its entries given back).
func waitHandoffEmpty(t *testing.T, s *Server, h *handoff) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); s.handoff.used.Load() != 0 || h.held() != 0; {
		if time.Now().After(deadline) {
			t.Fatalf("the hand-off still holds %d bytes in %d entries", s.handoff.used.Load(), h.held())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// randomBytes are n bytes that do not compress.
func randomBytes(seed uint64, n int) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// s2Frame encodes records first.. as one S2 DATA frame, as an agent does
// for its initial copy.
func s2Frame(first uint64, recs ...replication.Record) replication.Frame {
	return replication.S2DataFrame(encodeAsFrame(first, recs...), first, uint32(len(recs)), nil)
}

// plainFrame encodes records first.. as one uncompressed DATA frame.
func plainFrame(first uint64, recs ...replication.Record) replication.Frame {
	return replication.PlainDataFrame(encodeAsFrame(first, recs...), first, uint32(len(recs)))
}

// encodeAsFrame encodes records first.. as dataFrame numbers them.
func encodeAsFrame(first uint64, recs ...replication.Record) []byte {
	f := dataFrame(first, recs...)
	raw, _, err := replication.DefaultCodec().Records(&f, nil)
	if err != nil {
		panic(err)
	}
	var enc []byte
	for i := range raw {
		enc = replication.AppendRecord(enc, &raw[i])
	}
	return enc
}

// shipFrame sends f, sealed at once, and waits for its acknowledgement.
func (ta *testAgent) shipFrame(f replication.Frame) {
	ta.t.Helper()
	f.Flags |= replication.FlagTag
	ta.send(f)
	last := f.Seq + uint64(f.Count) - 1
	for {
		if a := ta.read(); a.Type == replication.FrameAck && a.Seq >= last {
			return
		}
	}
}

// TestHandoffDecodesEachFrameOnce: the frames an agent sends (zstd, S2,
// and plain data that does not compress) are decoded and checked by the
// connection's reader, and the applier takes their records from the
// hand-off instead of decoding them again from the segment files: every
// frame a hit, none a miss. A plain frame the server compresses itself
// is not handed off (the cache holds bytes the reader never decoded): the
// applier decodes it from the file. The replica holds every byte, and the
// budget is given back once the segments are applied.
func TestHandoffDecodesEachFrameOnce(t *testing.T) {
	r := mustTLSRig(t)
	a := protectWithLogA(t, r) // seq 1-3
	h := machineOf(t, r.s).rep.handoff
	hits0, misses0 := h.hits.Load(), h.misses.Load()
	text := bytes.Repeat([]byte("compresses well "), 8192) // 128 KiB
	random := randomBytes(1, 256<<10)
	a.shipFrame(s2Frame(4, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: text},
		replication.Record{Kind: replication.KindWrite, Offset: 256 << 10, Data: random[:64<<10]}))
	a.shipFrame(plainFrame(6, replication.Record{Kind: replication.KindWrite, Offset: 512 << 10, Data: random}))
	a.shipFrame(dataFrame(7, replication.Record{Kind: replication.KindWrite, Offset: 128 << 10, Data: text[:64<<10]},
		replication.Record{Kind: replication.KindTag}))
	waitApplied(t, r.s, 8)
	if hits, misses := h.hits.Load()-hits0, h.misses.Load()-misses0; hits != 3 || misses != 0 {
		t.Fatalf("hand-off hits %d, misses %d: want every one of the 3 frames decoded once", hits, misses)
	}
	// Plain and compressible (and under 64 KiB, so the server always
	// tries): the server compresses it before the cache.
	a.shipFrame(plainFrame(9, replication.Record{Kind: replication.KindWrite, Offset: 768 << 10, Data: text[:32<<10]}))
	waitApplied(t, r.s, 9)
	if hits, misses := h.hits.Load()-hits0, h.misses.Load()-misses0; hits != 3 || misses != 1 {
		t.Fatalf("hand-off hits %d, misses %d after a frame compressed by the server: want it decoded from the file", hits, misses)
	}
	mustReplicaHolds(t, r.s, 0, text)
	mustReplicaHolds(t, r.s, 128<<10, text[:64<<10])
	mustReplicaHolds(t, r.s, 256<<10, random[:64<<10])
	mustReplicaHolds(t, r.s, 512<<10, random)
	mustReplicaHolds(t, r.s, 768<<10, text[:32<<10])
	waitHandoffEmpty(t, r.s, h)
}

// TestHandoffBoundAndRestart: while the applier is stalled (the target out
// of reach) the hand-off takes frames only up to its budget and refuses
// the rest, whose records the applier decodes from their segments; a
// restart loses every entry, and the frames cached before it are decoded
// from the files. Every byte reaches the replica either way.
func TestHandoffBoundAndRestart(t *testing.T) {
	const budget = 600 << 10
	r := mustTLSRigWith(t, func(c *Config) { c.HandoffBytes, c.HandoffWait = budget, time.Millisecond })
	a := protectWithLogA(t, r)
	h := machineOf(t, r.s).rep.handoff
	hits0 := h.hits.Load()
	r.target.shut()
	var want [][]byte
	for i := range 8 {
		d := randomBytes(uint64(10+i), 100<<10)
		want = append(want, d)
		a.shipFrame(s2Frame(uint64(4+i), replication.Record{Kind: replication.KindWrite, Offset: uint64(i) * (128 << 10), Data: d}))
		if u := r.s.handoff.used.Load(); u > budget {
			t.Fatalf("the hand-off holds %d bytes, over its %d", u, budget)
		}
	}
	if h.refused.Load() == 0 {
		t.Fatalf("8 frames of 100 KiB all held within %d bytes", budget)
	}
	r.target.open()
	waitApplied(t, r.s, 11)
	if hits, misses := h.hits.Load()-hits0, h.misses.Load(); hits == 0 || misses == 0 || hits+misses != 8 {
		t.Fatalf("hits %d, misses %d: want some of each, 8 in all", hits, misses)
	}
	for i, d := range want {
		mustReplicaHolds(t, r.s, int64(i)*(128<<10), d)
	}
	waitHandoffEmpty(t, r.s, h)

	// Cached, not applied, when the server stops.
	r.target.shut()
	var later [][]byte
	for i := range 3 {
		d := randomBytes(uint64(20+i), 32<<10)
		later = append(later, d)
		a.shipFrame(s2Frame(uint64(12+i), replication.Record{Kind: replication.KindWrite, Offset: uint64(i) * (128 << 10), Data: d}))
	}
	a.c.Close()
	r.restart(t)
	h = machineOf(t, r.s).rep.handoff
	r.target.open()
	waitApplied(t, r.s, 14)
	if hits, misses := h.hits.Load(), h.misses.Load(); hits != 0 || misses < 3 {
		t.Fatalf("after a restart hits %d, misses %d: want every frame decoded from its file", hits, misses)
	}
	for i, d := range later {
		mustReplicaHolds(t, r.s, int64(i)*(128<<10), d)
	}
}

// TestHandoffTakesOnlyItsFrame: an entry whose key differs from the frame
// the segment file holds (here its payload checksum) is never applied:
// the frame is decoded from the file, the entry dropped once the applier
// is past it; an entry with the frame's key is taken instead of a decode.
func TestHandoffTakesOnlyItsFrame(t *testing.T) {
	r := mustReplica(t, nil)
	r.waitApplied(t, 1)
	epoch, _, _ := r.cache.takeOver()
	hits0, misses0 := r.rep.handoff.hits.Load(), r.rep.handoff.misses.Load()
	codec := replication.DefaultCodec()
	put := func(f replication.Frame, key replication.FrameKey, lie []byte) {
		t.Helper()
		recs, buf, err := codec.CheckRecords(&f, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		if lie != nil {
			recs[0].Data = lie
		}
		if !r.rep.handoff.put(key, recs, buf) {
			t.Fatal("put refused")
		}
	}
	inFile := []byte("the records of the cache file")
	f2 := dataFrame(2, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: inFile})
	k2, err := r.cache.append(epoch, &f2)
	if err != nil {
		t.Fatal(err)
	}
	wrong := k2
	wrong.PCRC ^= 1
	put(f2, wrong, []byte("records of another frame!!!!!"))
	f3 := dataFrame(3, replication.Record{Kind: replication.KindWrite, Offset: 4096, Data: []byte("handed over")})
	k3, err := r.cache.append(epoch, &f3)
	if err != nil {
		t.Fatal(err)
	}
	put(f3, k3, nil)
	r.waitApplied(t, 3)
	if hits, misses := r.rep.handoff.hits.Load()-hits0, r.rep.handoff.misses.Load()-misses0; hits != 1 || misses != 1 {
		t.Fatalf("hits %d, misses %d: want the frame with its key taken, the other decoded", hits, misses)
	}
	rd, _, _ := r.rep.handles(0)
	got := make([]byte, len(inFile))
	rd.ReadAt(got, 0)
	if !bytes.Equal(got, inFile) {
		t.Fatalf("replica holds %q: want the file's records", got)
	}
	for deadline := time.Now().Add(time.Minute); r.rep.handoff.held() != 0 || r.rep.handoff.budget.used.Load() != 0; {
		if time.Now().After(deadline) {
			t.Fatalf("the mismatched entry was never dropped: %d held, %d bytes", r.rep.handoff.held(), r.rep.handoff.budget.used.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestHandoffWholeSegmentUnread: before the machine's first point (the
// initial copy), a segment every frame of which the hand-off holds with
// the key the cache wrote is applied from the hand-off alone, its file
// not read: bytes spoiled in the file after the write are never seen,
// the replica holds what was sent. After a point (segments are kept on
// the target from then on) the same spoiled file is read and scanned
// whole, and fails: not applied, the disk marked for resync. A segment
// with one frame missing from the hand-off is read too.
func TestHandoffWholeSegmentUnread(t *testing.T) {
	r := mustReplica(t, nil)
	r.waitApplied(t, 1)
	epoch, _, _ := r.cache.takeOver()
	h := r.rep.handoff
	hits0, misses0 := h.hits.Load(), h.misses.Load() // segment 1, written before the start: read
	codec := replication.DefaultCodec()
	// frame appends f to the cache as the cacheWriter does, the records
	// handed off first unless skip.
	frame := func(f replication.Frame, skip bool) {
		t.Helper()
		var hdr [replication.FrameHeaderSize]byte
		key := replication.EncodeFrameHeader(&hdr, &f)
		if !skip {
			recs, buf, err := codec.CheckRecords(&f, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			if !h.put(key, recs, buf) {
				t.Fatal("put refused")
			}
		}
		if err := r.cache.appendEncoded(epoch, &f, &hdr, key); err != nil {
			t.Fatal(err)
		}
	}
	// spoil flips a byte of every record's data in the open file.
	spoil := func(data ...[]byte) {
		t.Helper()
		path := filepath.Join(r.dir, openName)
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range data {
			i := bytes.Index(b, d)
			if i < 0 {
				t.Fatalf("%q not in the open file", d[:8])
			}
			b[i+len(d)/2] ^= 0xff
		}
		if err := os.WriteFile(path, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	one, two := randomBytes(1, 8<<10), randomBytes(2, 8<<10)
	frame(plainFrame(2, replication.Record{Kind: replication.KindWrite, Offset: 0, Data: one}), false)
	frame(plainFrame(3, replication.Record{Kind: replication.KindWrite, Offset: 64 << 10, Data: two}), false)
	spoil(one, two)
	r.waitApplied(t, 3)
	if w, hits, misses := h.whole.Load(), h.hits.Load()-hits0, h.misses.Load()-misses0; w != 1 || hits != 2 || misses != 0 {
		t.Fatalf("whole segments %d, hits %d, misses %d: want the one segment taken whole (2 hits)", w, hits, misses)
	}
	rd, _, _ := r.rep.handles(0)
	for off, want := range map[int64][]byte{0: one, 64 << 10: two} {
		got := make([]byte, len(want))
		rd.ReadAt(got, off)
		if !bytes.Equal(got, want) {
			t.Fatalf("replica at %d does not hold what was sent", off)
		}
	}
	if m := r.rep.machine(); m.Disks[0].State == replication.StateResync {
		t.Fatalf("disk marked for resync: %+v", m.Disks[0])
	}

	// A frame flagged as a tag that holds no point's tag (the end of an
	// initial copy ships so, to be sealed at once): still taken whole.
	six := randomBytes(6, 8<<10)
	tagged := plainFrame(4, replication.Record{Kind: replication.KindWrite, Offset: 320 << 10, Data: six},
		replication.Record{Kind: replication.KindProgress, Offset: 1 << 20, Flags: replication.FlagDone})
	tagged.Flags |= replication.FlagTag
	frame(tagged, false)
	spoil(six)
	r.waitApplied(t, 5)
	if w := h.whole.Load(); w != 2 {
		t.Fatalf("whole segments %d: want the segment with the end of a copy taken whole too", w)
	}
	got := make([]byte, len(six))
	rd.ReadAt(got, 320<<10)
	if !bytes.Equal(got, six) {
		t.Fatal("replica does not hold what was sent in the tagged frame")
	}

	// One frame's records not handed off: the file is read, and fails.
	three, four := randomBytes(3, 8<<10), randomBytes(4, 8<<10)
	frame(plainFrame(6, replication.Record{Kind: replication.KindWrite, Offset: 128 << 10, Data: three}), false)
	frame(plainFrame(7, replication.Record{Kind: replication.KindWrite, Offset: 192 << 10, Data: four}), true)
	spoil(four)
	r.waitApplied(t, 7)
	if m := r.rep.machine(); m.Disks[0].State != replication.StateResync || !strings.Contains(m.Disks[0].Reason, "failed verification") {
		t.Fatalf("a spoiled segment read from its file: disk %+v, want marked for resync", m.Disks[0])
	}
	if w := h.whole.Load(); w != 2 {
		t.Fatalf("whole segments %d: want the segment with a frame missing read from its file", w)
	}

	// After a point: every frame handed off, and still read.
	r.rep.pointMade.Store(true)
	r.rep.mu.Lock()
	err := r.rep.a.MarkResync(context.Background(), -1, "")
	r.rep.mu.Unlock()
	if err != nil {
		t.Fatal(err)
	}
	bad0 := badCount(t, r.dir)
	five := randomBytes(5, 8<<10)
	frame(plainFrame(8, replication.Record{Kind: replication.KindWrite, Offset: 256 << 10, Data: five}), false)
	spoil(five)
	r.waitApplied(t, 8)
	if w := h.whole.Load(); w != 2 {
		t.Fatalf("whole segments %d after a point: want every segment read", w)
	}
	if n := badCount(t, r.dir); n != bad0+1 {
		t.Fatalf("%d segments quarantined after a point, %d before: want the spoiled one", n, bad0)
	}
}

// badCount counts the quarantined segments of the cache directory dir.
func badCount(t *testing.T, dir string) int {
	t.Helper()
	es, err := os.ReadDir(filepath.Join(dir, "bad"))
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	return len(es)
}

// TestHandoffWaitsForAnApplierBehind: a frame of base data (the initial
// copy's) past the budget waits for the applier while it applies (here
// its checkpoint held by the target, which then answers) rather than be
// refused and decoded again from its segment: no refusal, no miss. A
// frame of the guest's changes past the budget never waits: refused at
// once, its backlog left to the cache. While the applier's tries fail
// (the target refusing), every frame is refused at once and nothing is
// held (the budget all machines share goes to appliers that apply), the
// cache taking the agent's frames at full speed: with a wait of a minute
// allowed, their acknowledgements come within the read's 30 s.
func TestHandoffWaitsForAnApplierBehind(t *testing.T) {
	r := mustTLSRigWith(t, func(c *Config) {
		c.HandoffBytes = 180 << 10 // two frames of 64 KiB, not three
		c.HandoffWait = time.Minute
	})
	a := protectWithLogA(t, r)
	h := machineOf(t, r.s).rep.handoff
	hits0, misses0, refused0 := h.hits.Load(), h.misses.Load(), h.refused.Load()
	var want [][]byte
	frame := func(kind replication.Kind) replication.Frame {
		i := len(want)
		d := randomBytes(uint64(40+i), 64<<10)
		want = append(want, d)
		f := s2Frame(uint64(4+i), replication.Record{Kind: kind, Offset: uint64(i) * (64 << 10), Data: d})
		f.Flags |= replication.FlagTag
		return f
	}
	// waitAck reads until seq is acknowledged.
	waitAck := func(seq uint64) {
		t.Helper()
		for {
			if f := a.read(); f.Type == replication.FrameAck && f.Seq >= seq {
				return
			}
		}
	}
	counts := func() (hits, misses, refused, waited int64) {
		return h.hits.Load() - hits0, h.misses.Load() - misses0, h.refused.Load() - refused0, h.waited.Load()
	}
	r.target.shut()
	a.shipFrame(frame(replication.KindBase))
	a.shipFrame(frame(replication.KindBase))
	a.send(frame(replication.KindBase))
	for deadline := time.Now().Add(time.Minute); h.waited.Load() == 0; {
		if time.Now().After(deadline) {
			t.Fatalf("the third frame never waited: %d bytes held of %d", r.s.handoff.used.Load(), r.s.handoff.max)
		}
		time.Sleep(5 * time.Millisecond)
	}
	r.target.open()
	waitAck(6)
	waitApplied(t, r.s, 6)
	if hits, misses, refused, waited := counts(); hits != 3 || misses != 0 || refused != 0 || waited != 1 {
		t.Fatalf("hits %d, misses %d, refused %d, waited %d: want the third frame to wait, then taken", hits, misses, refused, waited)
	}

	// The guest's changes: the applier held again, and the third frame
	// past the budget is refused at once.
	r.target.shut()
	for range 3 {
		a.shipFrame(frame(replication.KindWrite))
	}
	if _, _, refused, waited := counts(); refused == 0 || waited != 1 {
		t.Fatalf("refused %d, waited %d: want the guest's changes past the budget refused, none waiting", refused, waited)
	}
	r.target.open()
	waitApplied(t, r.s, 9)

	// The target refusing: the applier's tries fail, and it is stalled.
	r.target.fail(errors.New("target out of reach"))
	refused1 := h.refused.Load()
	a.shipFrame(frame(replication.KindBase))
	for deadline := time.Now().Add(time.Minute); !h.stalled.Load(); {
		if time.Now().After(deadline) {
			t.Fatal("the applier never failed against the refusing target")
		}
		time.Sleep(5 * time.Millisecond)
	}
	for range 3 {
		a.shipFrame(frame(replication.KindBase))
	}
	if _, _, _, waited := counts(); waited != 1 || h.refused.Load()-refused1 < 3 || h.held() != 0 {
		t.Fatalf("waited %d, refused %d, %d held while the applier failed: want every frame refused at once, nothing held", waited, h.refused.Load()-refused1, h.held())
	}
	r.target.open()
	waitApplied(t, r.s, 13)
	for i, d := range want {
		mustReplicaHolds(t, r.s, int64(i)*(64<<10), d)
	}
	waitHandoffEmpty(t, r.s, h)
}

// TestHandoffBuffersReused: once a frame handed off is applied (the
// replica flushed), its decode buffer goes to the pool and the reader
// decodes a later frame into it, instead of a new buffer whose pages the
// kernel must fault in again. Every frame still reaches the replica as
// sent: a reused buffer is only written after the records it held are on
// the replica.
func TestHandoffBuffersReused(t *testing.T) {
	r := mustTLSRig(t)
	a := protectWithLogA(t, r) // seq 1-3
	h := machineOf(t, r.s).rep.handoff
	pool := &r.s.handoff.pool
	reused0 := pool.reused.Load()
	var want [][]byte
	for i := range 6 {
		d := randomBytes(uint64(40+i), 96<<10)
		d = append(d, bytes.Repeat([]byte{byte(i)}, 32<<10)...) // compresses a little: S2 keeps it
		want = append(want, d)
		a.shipFrame(s2Frame(uint64(4+i), replication.Record{Kind: replication.KindWrite, Offset: uint64(i) * (128 << 10), Data: d}))
		waitApplied(t, r.s, uint64(4+i))
	}
	if n := pool.reused.Load() - reused0; n < 4 {
		t.Fatalf("the reader took %d pooled buffers for 6 frames each applied before the next was sent: want the applied frames' buffers back", n)
	}
	for i, d := range want {
		mustReplicaHolds(t, r.s, int64(i)*(128<<10), d)
	}
	waitHandoffEmpty(t, r.s, h)
	if held := pool.held(); held > r.s.handoff.max {
		t.Fatalf("the pool holds %d bytes, over the budget's %d", held, r.s.handoff.max)
	}
}

// TestBufPool: a pooled buffer is returned only for a size it holds, the
// pool keeps no more than its bound, and drops everything once no buffer
// was taken for poolIdle.
func TestBufPool(t *testing.T) {
	var p bufPool
	p.put(make([]byte, 10, 100), 250)
	p.put(make([]byte, 0, 100), 250)
	p.put(make([]byte, 0, 100), 250) // past 250: dropped
	if got := p.held(); got != 200 {
		t.Fatalf("pool holds %d bytes, want 200", got)
	}
	if b := p.get(101); b != nil {
		t.Fatalf("got a buffer of %d for 101 bytes", cap(b))
	}
	b := p.get(100)
	if b == nil || len(b) != 0 || cap(b) != 100 {
		t.Fatalf("got len %d cap %d, want an empty buffer of 100", len(b), cap(b))
	}
	if got := p.held(); got != 100 {
		t.Fatalf("pool holds %d bytes after a get, want 100", got)
	}
	p.trim() // a buffer was just taken: kept
	if got := p.held(); got != 100 {
		t.Fatalf("pool holds %d bytes after a trim while in use, want 100", got)
	}
	p.last = time.Now().Add(-poolIdle)
	p.trim()
	if got := p.held(); got != 0 || p.get(1) != nil {
		t.Fatalf("pool holds %d bytes after idling: want none", got)
	}
}
