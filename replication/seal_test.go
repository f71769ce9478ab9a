package replication_test

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/memtarget"
)

func TestSealedCodec(t *testing.T) {
	key := bytes.Repeat([]byte{7}, 32)
	c, err := replication.NewSealedCodec(key)
	if err != nil {
		t.Fatal(err)
	}
	plain := []byte(`{"name":"secret-machine"}`)
	b, err := c.Seal("machines/a/machine", "machine", plain)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(b, []byte("secret-machine")) {
		t.Fatal("sealed object holds the plain text")
	}
	if got, err := c.Open("machines/a/machine", "machine", b); err != nil || !bytes.Equal(got, plain) {
		t.Fatalf("open: %q, %v", got, err)
	}
	other, _ := replication.NewSealedCodec(bytes.Repeat([]byte{8}, 32))
	bad := append([]byte(nil), b...)
	bad[len(bad)/2] ^= 1
	for name, open := range map[string]func() ([]byte, error){
		"wrong key":   func() ([]byte, error) { return other.Open("machines/a/machine", "machine", b) },
		"moved":       func() ([]byte, error) { return c.Open("machines/b/machine", "machine", b) },
		"other kind":  func() ([]byte, error) { return c.Open("machines/a/machine", "point", b) },
		"flipped bit": func() ([]byte, error) { return c.Open("machines/a/machine", "machine", bad) },
	} {
		if _, err := open(); !errors.Is(err, replication.ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", name, err)
		}
	}
	framed, _ := replication.PlainCodec{}.Seal("k", "machine", plain)
	if _, err := c.Open("k", "machine", framed); !errors.Is(err, replication.ErrNotSealed) {
		t.Fatalf("plain object: %v, want ErrNotSealed", err)
	}
}

func TestVaultDataKey(t *testing.T) {
	v, err := replication.NewVaultInfo("v1", []byte("right"))
	if err != nil {
		t.Fatal(err)
	}
	k1, err := v.DataKey([]byte("right"))
	if err != nil || len(k1) != 32 {
		t.Fatalf("data key: %d bytes, %v", len(k1), err)
	}
	if k2, _ := v.DataKey([]byte("right")); !bytes.Equal(k1, k2) {
		t.Fatal("the data key changes between unwraps")
	}
	if _, err := v.DataKey([]byte("wrong")); !errors.Is(err, replication.ErrWrongPassphrase) {
		t.Fatalf("wrong passphrase: %v", err)
	}
	v.ID = "v2" // the wrapped key is bound to its vault
	if _, err := v.DataKey([]byte("right")); err == nil {
		t.Fatal("a data key unwrapped for another vault id")
	}
}

// TestEncryptVault: a vault written before encryption existed (plain
// objects, raw segments) is converted in place when opened; everything
// still reads, and nothing on the target is plain but the descriptor.
func TestEncryptVault(t *testing.T) {
	ctx := context.Background()
	tgt := memtarget.New()
	defer tgt.Close()
	pass := []byte("passphrase")
	v, _ := replication.NewVaultInfo("v1", pass)
	v.WrappedKey, v.MAC = nil, nil // as made before encryption
	plain := &replication.Catalog{T: tgt, Codec: replication.PlainCodec{}}
	if err := plain.PutVault(ctx, v); err != nil {
		t.Fatal(err)
	}
	m := &replication.MachineCatalog{ID: "m1", Name: "secret-machine"}
	if err := plain.PutMachine(ctx, m); err != nil {
		t.Fatal(err)
	}
	p := replication.Point{ID: "5", Seq: 5, Time: time.Unix(100, 0).UTC(), Kind: "crash"}
	if err := plain.PutPoint(ctx, "m1", p); err != nil {
		t.Fatal(err)
	}
	seg := []byte("raw segment bytes, secret-machine")
	si := replication.SegmentInfo{First: 1, Last: 5, LastTime: time.Unix(100, 0)}
	if err := tgt.PutObject(ctx, "machines/m1/segments/0000000000000001-0000000000000005.0000000000000064.seg", seg); err != nil {
		t.Fatal(err) // as written before segments went through the codec
	}

	if _, _, err := replication.OpenVault(ctx, tgt, []byte("wrong")); !errors.Is(err, replication.ErrWrongPassphrase) {
		t.Fatalf("wrong passphrase: %v", err)
	}
	// A conversion cut short (the target fails after the descriptor and
	// one object) goes on with the same key at the next open.
	if _, _, err := replication.OpenVault(ctx, &failingPuts{Target: tgt, left: 2}, pass); err == nil {
		t.Fatal("a conversion whose writes fail succeeded")
	}
	cat, v2, err := replication.OpenVault(ctx, tgt, pass)
	if err != nil {
		t.Fatal(err)
	}
	if v2.WrappedKey == nil || v2.Encrypting {
		t.Fatalf("vault after conversion: %+v", v2)
	}
	objs, _ := tgt.ListObjects(ctx, "")
	for _, o := range objs {
		b, _ := tgt.GetObject(ctx, o.Key)
		if bytes.Contains(b, []byte("secret-machine")) {
			t.Errorf("%s is still plain on the target", o.Key)
		}
	}
	if got, err := cat.Machine(ctx, "m1"); err != nil || got.Name != "secret-machine" {
		t.Fatalf("machine after conversion: %+v, %v", got, err)
	}
	if ps, err := cat.Points(ctx, "m1"); err != nil || len(ps) != 1 {
		t.Fatalf("points after conversion: %v, %v", ps, err)
	}
	segs, err := cat.Segments(ctx, "m1")
	if err != nil || len(segs) != 1 || segs[0].First != si.First {
		t.Fatalf("segments: %v, %v", segs, err)
	}
	if got, err := cat.Segment(ctx, segs[0]); err != nil || !bytes.Equal(got, seg) {
		t.Fatalf("segment after conversion: %q, %v", got, err)
	}
	// A plain catalog no longer reads what the vault sealed.
	if _, err := plain.Machine(ctx, "m1"); err == nil {
		t.Fatal("a sealed machine object read without the key")
	}
	// Reopened: the same key opens everything.
	cat2, _, err := replication.OpenVault(ctx, tgt, pass)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := cat2.Machine(ctx, "m1"); err != nil || got.Name != "secret-machine" {
		t.Fatalf("machine after reopening: %+v, %v", got, err)
	}
	// The descriptor is authenticated: changed without the passphrase (the
	// conversion mark set, or the key removed), it is refused, and no new
	// key replaces the one the objects are sealed with.
	tampered := v2
	tampered.Encrypting = true
	plain.PutVault(ctx, tampered)
	if _, _, err := replication.OpenVault(ctx, tgt, pass); !errors.Is(err, replication.ErrCorrupt) {
		t.Fatalf("descriptor with the conversion mark set by hand: %v", err)
	}
	tampered = v2
	tampered.WrappedKey, tampered.MAC = nil, nil
	plain.PutVault(ctx, tampered)
	if _, _, err := replication.OpenVault(ctx, tgt, pass); !errors.Is(err, replication.ErrCorrupt) {
		t.Fatalf("descriptor with its key removed: %v", err)
	}
	if got, _ := plain.Vault(ctx); got.WrappedKey != nil {
		t.Fatal("a new data key was made over sealed objects")
	}
	plain.PutVault(ctx, v2) // restored
	if _, _, err := replication.OpenVault(ctx, tgt, pass); err != nil {
		t.Fatalf("restored descriptor: %v", err)
	}
}

// failingPuts is a target whose PutObject fails after left successes.
type failingPuts struct {
	replication.Target
	left int
}

func (f *failingPuts) PutObject(ctx context.Context, key string, data []byte) error {
	if f.left <= 0 {
		return errors.New("injected: storage unavailable")
	}
	f.left--
	return f.Target.PutObject(ctx, key, data)
}
