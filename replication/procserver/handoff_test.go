package procserver

import (
	"bytes"
	"math/rand/v2"
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
	r := mustTLSRigWith(t, func(c *Config) { c.HandoffBytes = budget })
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
