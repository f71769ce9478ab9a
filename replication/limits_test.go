package replication

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestValidate(t *testing.T) {
	disk := func(i int) DiskInfo { return DiskInfo{Index: uint32(i), Name: fmt.Sprintf("d%d", i), Size: 1 << 30} }
	disks := func(n int) []DiskInfo {
		ds := make([]DiskInfo, n)
		for i := range ds {
			ds[i] = disk(i)
		}
		return ds
	}
	ranges := func(n int) []Range {
		rs := make([]Range, n)
		for i := range rs {
			rs[i] = Range{Off: int64(i) * 8 << 20, Len: 4 << 20}
		}
		return rs
	}
	withDisk := func(change func(*DiskInfo)) *Hello {
		d := disk(0)
		change(&d)
		return &Hello{Disks: []DiskInfo{d}}
	}
	offs := func(n int) []int64 {
		o := make([]int64, n)
		for i := range o {
			o[i] = int64(i) * HashChunk
		}
		return o
	}
	cases := []struct {
		name string
		msg  interface{ Validate() error }
		ok   bool
	}{
		{"hello", &Hello{Disks: disks(3)}, true},
		{"hello bios uuid", &Hello{BIOSUUID: "4217f2a3-9b1c-4c6e-8f00-1a2b3c4d5e6f"}, true},
		{"hello bad bios uuid", &Hello{BIOSUUID: "4217f2a3-9b1c-4c6e-8f00-1a2b3c4d5e6"}, false},
		{"hello hostile bios uuid", &Hello{BIOSUUID: "4217f2a3-9b1c-4c6e-8f00-1a2b3c4d5e6'"}, false},
		{"hello scan disk", withDisk(func(d *DiskInfo) { d.Mode = DiskModeScan }), true},
		{"hello bad mode", withDisk(func(d *DiskInfo) { d.Mode = "copy" }), false},
		{"hello of 64 disks", &Hello{Disks: disks(MaxDisks)}, true},
		{"hello of 65 disks", &Hello{Disks: disks(MaxDisks + 1)}, false},
		{"hello bad name", withDisk(func(d *DiskInfo) { d.Name = "../x" }), false},
		{"hello empty name", withDisk(func(d *DiskInfo) { d.Name = "" }), false},
		{"hello negative size", withDisk(func(d *DiskInfo) { d.Size = -1 }), false},
		{"hello huge size", withDisk(func(d *DiskInfo) { d.Size = MaxDiskSize + 1 }), false},
		{"hello same name twice", &Hello{Disks: []DiskInfo{disk(0), {Index: 1, Name: "d0"}}}, false},
		{"hello same index twice", &Hello{Disks: []DiskInfo{disk(0), {Index: 0, Name: "d1"}}}, false},
		{"hello diverged ranges", withDisk(func(d *DiskInfo) { d.Diverged, d.DivergedRanges = "x", ranges(MaxDivergedRanges) }), true},
		{"hello too many ranges", withDisk(func(d *DiskInfo) { d.Diverged, d.DivergedRanges = "x", ranges(MaxDivergedRanges+1) }), false},
		{"hello negative range", withDisk(func(d *DiskInfo) { d.DivergedRanges = []Range{{Off: -1, Len: 1}} }), false},
		{"hello empty range", withDisk(func(d *DiskInfo) { d.DivergedRanges = []Range{{Off: 0, Len: 0}} }), false},
		{"hello overflowing range", withDisk(func(d *DiskInfo) { d.DivergedRanges = []Range{{Off: 1, Len: 1<<63 - 1}} }), false},
		{"status", &Status{Disks: make([]DiskProgress, MaxDisks), Events: make([]AgentEvent, MaxStatusEvents)}, true},
		{"status too many disks", &Status{Disks: make([]DiskProgress, MaxDisks+1)}, false},
		{"status too many events", &Status{Events: make([]AgentEvent, MaxStatusEvents+1)}, false},
		{"welcome", &Welcome{Policy: &AgentPolicy{CrashInterval: 1, Group: "g-1"}}, true},
		{"welcome bad group", &Welcome{Policy: &AgentPolicy{Group: "-g"}}, false},
		{"policy negative", &AgentPolicy{CrashInterval: -1}, false},
		{"resync", &ResyncJob{Ranges: ranges(MaxDivergedRanges)}, true},
		{"resync whole disk", &ResyncJob{}, true},
		{"resync too many ranges", &ResyncJob{Ranges: ranges(MaxDivergedRanges + 1)}, false},
		{"resync negative range", &ResyncJob{Ranges: []Range{{Off: -HashChunk, Len: HashChunk}}}, false},
		{"hashes", &Hashes{Offs: offs(MaxHashBatch), Hashes: make([]byte, 16*MaxHashBatch)}, true},
		{"hashes too many", &Hashes{Offs: offs(MaxHashBatch + 1), Hashes: make([]byte, 16*(MaxHashBatch+1))}, false},
		{"hashes short", &Hashes{Offs: offs(2), Hashes: make([]byte, 31)}, false},
		{"hashes unaligned", &Hashes{Offs: []int64{1}, Hashes: make([]byte, 16)}, false},
		{"hashes negative", &Hashes{Offs: []int64{-HashChunk}, Hashes: make([]byte, 16)}, false},
		{"hashes out of order", &Hashes{Offs: []int64{HashChunk, 0}, Hashes: make([]byte, 32)}, false},
		{"want", &Want{Chunks: []WantChunk{{Off: 0, Leaves: make([]byte, 16*HashFanout)}, {Off: HashChunk, Leaves: make([]byte, 16)}}}, true},
		{"want error", &Want{Error: "no index"}, true},
		{"want too many", &Want{Chunks: make([]WantChunk, MaxHashBatch+1)}, false},
		{"want no leaves", &Want{Chunks: []WantChunk{{Off: 0}}}, false},
		{"want too many leaves", &Want{Chunks: []WantChunk{{Off: 0, Leaves: make([]byte, 16*HashFanout+16)}}}, false},
		{"want partial leaf", &Want{Chunks: []WantChunk{{Off: 0, Leaves: make([]byte, 17)}}}, false},
		{"freeze", &Freeze{ID: "planned-2026.12_a", Req: 3}, true},
		{"freeze no id", &Freeze{Req: 3}, false},
		{"freeze path id", &Freeze{ID: "../x"}, false},
		{"freeze long id", &Freeze{ID: strings.Repeat("a", 65)}, false},
		{"status frozen", &Status{Failover: "planned-1"}, true},
		{"status bad failover", &Status{Failover: "a b"}, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.msg.Validate()
			if c.ok && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !c.ok && !errors.Is(err, ErrCorrupt) {
				t.Fatalf("Validate = %v, want a protocol error", err)
			}
		})
	}
}

// TestLargestHelloFits checks the control-frame limit against the largest
// Hello the limits allow, with the longest names.
func TestLargestHelloFits(t *testing.T) {
	h := Hello{MachineID: strings.Repeat("f", 64), AgentVersion: strings.Repeat("v", 64)}
	for i := range MaxDisks {
		d := DiskInfo{Index: uint32(i), Name: fmt.Sprintf("%064d", i), Size: MaxDiskSize,
			Diverged: strings.Repeat("r", 200), DivergedRanges: make([]Range, MaxDivergedRanges)}
		for j := range d.DivergedRanges {
			d.DivergedRanges[j] = Range{Off: MaxDiskSize - 1<<30, Len: 1 << 30}
		}
		h.Disks = append(h.Disks, d)
	}
	if err := h.Validate(); err != nil {
		t.Fatal(err)
	}
	f, err := JSONFrame(FrameHello, h)
	if err != nil {
		t.Fatal(err)
	}
	if len(f.Payload) > MaxControlPayload {
		t.Fatalf("the largest valid hello takes %d bytes, over the %d limit", len(f.Payload), MaxControlPayload)
	}
	t.Logf("the largest valid hello takes %d bytes", len(f.Payload))
	var b bytes.Buffer
	if err := WriteFrame(&b, &f); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ReadFrame(&b, nil); err != nil {
		t.Fatal(err)
	}
}

func TestControlFrameLimit(t *testing.T) {
	f := Frame{Type: FrameStatus, Payload: make([]byte, MaxControlPayload+1)}
	b := AppendFrame(nil, &f)
	if _, _, err := ReadFrame(bytes.NewReader(b), nil); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("a status of %d bytes: %v, want a protocol error", len(f.Payload), err)
	}
}

func TestParseBIOSUUID(t *testing.T) {
	for in, want := range map[string]string{
		"4217F2A3-9B1C-4C6E-8F00-1A2B3C4D5E6F\n": "4217f2a3-9b1c-4c6e-8f00-1a2b3c4d5e6f",
		" 4217f2a3-9b1c-4c6e-8f00-1a2b3c4d5e6f":  "4217f2a3-9b1c-4c6e-8f00-1a2b3c4d5e6f",
	} {
		if got, err := ParseBIOSUUID(in); err != nil || got != want {
			t.Errorf("ParseBIOSUUID(%q) = %q, %v", in, got, err)
		}
	}
	for _, bad := range []string{"", "4217f2a39b1c4c6e8f001a2b3c4d5e6f", "4217f2a3-9b1c-4c6e-8f00-1a2b3c4d5e6g", "4217f2a3_9b1c-4c6e-8f00-1a2b3c4d5e6f"} {
		if _, err := ParseBIOSUUID(bad); err == nil {
			t.Errorf("ParseBIOSUUID(%q) accepted", bad)
		}
	}
}
