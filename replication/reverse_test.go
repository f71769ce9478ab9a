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
}

// FuzzDecodeReverse feeds REVERSE payloads and REVERSE_ACK JSON to their
// decoders: no panic, no allocation beyond the input.
func FuzzDecodeReverse(f *testing.F) {
	good, _ := ReverseFrame(1, ReverseData{ID: "f1", Off: 4096, Data: []byte("abc")})
	f.Add(good.Payload)
	f.Add([]byte{0})
	f.Add([]byte{64})
	f.Add([]byte(`{"id":"f1","seq":3,"sum":"00"}`))
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
				a.Validate()
			}
		})
	})
}
