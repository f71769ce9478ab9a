package replication

import (
	"bytes"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/asrdr/asr/replication/allocguard"
)

func TestReverseFrameRoundTrip(t *testing.T) {
	d := ReverseData{ID: "f1", Disk: 3, Off: 65536, Data: bytes.Repeat([]byte{7}, 4096)}
	f, err := ReverseFrame(9, d)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := WriteFrame(&buf, &f); err != nil {
		t.Fatal(err)
	}
	g, _, err := ReadFrame(&buf, nil)
	if err != nil || g.Type != FrameReverse || g.Seq != 9 {
		t.Fatalf("read back %v %v", g.Type, err)
	}
	got, err := DecodeReverse(&g)
	if err != nil || got.ID != "f1" || got.Disk != 3 || got.Off != 65536 || !bytes.Equal(got.Data, d.Data) {
		t.Fatalf("decoded %+v %v", got, err)
	}
}

func TestReverseRefused(t *testing.T) {
	for _, d := range []ReverseData{
		{ID: "", Data: []byte{1}},
		{ID: "-x", Data: []byte{1}},
		{ID: "f", Data: nil},
		{ID: "f", Data: make([]byte, MaxReverseData+1)},
		{ID: "f", Off: -1, Data: []byte{1}},
		{ID: "f", Off: MaxDiskSize, Data: []byte{1}},
	} {
		if _, err := ReverseFrame(1, d); err == nil {
			t.Errorf("built %+v", d)
		}
	}
	good, _ := ReverseFrame(1, ReverseData{ID: "f", Data: []byte{1, 2, 3}})
	bad := good
	bad.Payload = bytes.Clone(good.Payload)
	bad.Payload[len(bad.Payload)-1] ^= 1
	if _, err := DecodeReverse(&bad); !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), "checksum") {
		t.Errorf("a damaged payload: %v", err)
	}
	short := good
	short.Payload = good.Payload[:5]
	if _, err := DecodeReverse(&short); err == nil {
		t.Error("a short payload was decoded")
	}
	for _, a := range []ReverseAck{{ID: ""}, {ID: "f", Sum: "xyz"}, {ID: "f", Size: -1}, {ID: "f", Error: strings.Repeat("e", 5000)}} {
		if err := a.Validate(); err == nil {
			t.Errorf("ack %+v valid", a)
		}
	}
	if s := (ReverseSum{ID: "a b"}); s.Validate() == nil {
		t.Error("a bad sum request valid")
	}
	if a := (ReverseAck{ID: "f", Hashes: make([]byte, 17)}); a.Validate() == nil {
		t.Error("an ack with a partial block sum valid")
	}
	if a := (ReverseAck{ID: "f", Hashes: make([]byte, 16*(MaxReverseHashes+1))}); a.Validate() == nil {
		t.Error("an ack with too many block sums valid")
	}
}

// Block-sum requests are bounded: the block size, the count and the
// offset are checked before the agent reads anything.
func TestReverseSumBlocks(t *testing.T) {
	for _, c := range []struct {
		s  ReverseSum
		ok bool
	}{
		{ReverseSum{ID: "f"}, true},
		{ReverseSum{ID: "f", Off: 65536}, false},
		{ReverseSum{ID: "f", Count: 3}, false},
		{ReverseSum{ID: "f", Block: 65536, Count: 1}, true},
		{ReverseSum{ID: "f", Block: 65536, Off: 131072, Count: MaxReverseHashes}, true},
		{ReverseSum{ID: "f", Block: 65536, Count: MaxReverseHashes + 1}, false},
		{ReverseSum{ID: "f", Block: 65536, Count: 0}, false},
		{ReverseSum{ID: "f", Block: 65536, Off: 4096, Count: 1}, false},
		{ReverseSum{ID: "f", Block: 65536, Off: -65536, Count: 1}, false},
		{ReverseSum{ID: "f", Block: HashBlock, Off: HashChunk, Count: HashFanout, Leaves: true}, true},
		{ReverseSum{ID: "f", Block: 65536, Count: 1, Leaves: true}, false},
		{ReverseSum{ID: "f", Leaves: true}, false},
		{ReverseSum{ID: "f", Block: 65536, Off: MaxDiskSize, Count: 1}, false},
		{ReverseSum{ID: "f", Block: 1000, Count: 1}, false},
		{ReverseSum{ID: "f", Block: MaxReverseData * 2, Count: 1}, false},
	} {
		if err := c.s.Validate(); (err == nil) != c.ok {
			t.Errorf("%+v: %v, want valid %v", c.s, err, c.ok)
		}
	}
	r := ReverseSum{ID: "f", Block: 65536, Off: 65536, Count: 4}
	for _, c := range []struct {
		size int64
		want int
	}{{0, 0}, {65536, 0}, {65537, 1}, {3 * 65536, 2}, {10 * 65536, 4}} {
		if got := r.ReverseBlocks(c.size); got != c.want {
			t.Errorf("ReverseBlocks(%d) = %d, want %d", c.size, got, c.want)
		}
	}
	// The sum of a block is the resync's tree over its 4 KiB blocks.
	p := bytes.Repeat([]byte{5}, 3*HashBlock+100)
	if BlockSum(p) != ChunkHash(ChunkLeaves(p)) || BlockSum(p) == BlockSum(p[:len(p)-1]) {
		t.Error("BlockSum is not the resync's chunk hash")
	}
}

// FuzzDecodeReverse feeds REVERSE payloads and REVERSE_ACK JSON to their
// decoders: no panic, no allocation beyond the input.
func FuzzDecodeReverse(f *testing.F) {
	good, _ := ReverseFrame(1, ReverseData{ID: "f1", Off: 4096, Data: []byte("abc")})
	f.Add(good.Payload)
	f.Add([]byte{0})
	f.Add([]byte{64})
	f.Add([]byte(`{"id":"f1","seq":3,"sum":"00"}`))
	f.Add([]byte(`{"id":"f1","seq":3,"hashes":"AAAAAAAAAAAAAAAAAAAAAA=="}`))
	f.Add([]byte(`{"id":"f1","seq":3,"disk":1,"off":65536,"block":65536,"count":16}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		fr := Frame{Type: FrameReverse, Payload: data}
		allocguard.Check(t, "DecodeReverse", allocguard.Bound(len(data)), func() {
			d, err := DecodeReverse(&fr)
			if err == nil && (len(d.Data) == 0 || d.Off < 0 || !ValidFreezeID(d.ID)) {
				t.Fatalf("accepted %+v", d)
			}
		})
		allocguard.Check(t, "ReverseAck", allocguard.Bound(len(data)), func() {
			var a ReverseAck
			if json.Unmarshal(data, &a) == nil {
				if a.Validate() == nil && len(a.Hashes) > 16*MaxReverseHashes {
					t.Fatalf("accepted %d bytes of block sums", len(a.Hashes))
				}
			}
		})
		allocguard.Check(t, "ReverseSum", allocguard.Bound(len(data)), func() {
			var r ReverseSum
			if json.Unmarshal(data, &r) == nil && r.Validate() == nil {
				if n := r.ReverseBlocks(MaxDiskSize); n > MaxReverseHashes || r.Off%max(r.Block, 1) != 0 {
					t.Fatalf("accepted %+v: %d blocks", r, n)
				}
			}
		})
	})
}
