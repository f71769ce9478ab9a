package argon2id

import (
	"bytes"
	"fmt"
	"testing"

	"golang.org/x/crypto/argon2"
)

// TestSameAsXCrypto: every key is x/crypto's, for costs from the smallest
// to the vault's (64 MiB, 2 passes, 2 lanes), lane counts that do and do
// not divide the memory, and several key lengths.
func TestSameAsXCrypto(t *testing.T) {
	cases := []struct {
		time, memory uint32
		threads      uint8
		keyLen       uint32
	}{
		{1, 8, 1, 32},
		{1, 64, 1, 16},
		{2, 1 << 10, 1, 32},
		{3, 1 << 10, 3, 64},
		{1, 4<<10 + 7, 4, 32},
		{2, 64 << 10, 2, 32}, // replication.VaultKDF
		{1, 16 << 10, 16, 100},
	}
	for _, c := range cases {
		t.Run(fmt.Sprintf("t%d_m%d_p%d_k%d", c.time, c.memory, c.threads, c.keyLen), func(t *testing.T) {
			pw, salt := []byte("correct horse battery staple"), []byte("0123456789abcdef")
			got := IDKey(pw, salt, c.time, c.memory, c.threads, c.keyLen)
			want := argon2.IDKey(pw, salt, c.time, c.memory, c.threads, c.keyLen)
			if !bytes.Equal(got, want) {
				t.Fatalf("key %x, x/crypto's %x", got, want)
			}
		})
	}
}

// TestReferenceVectors: keys of the reference implementation's command
// (phc-winner-argon2), as x/crypto's own test lists them for "password"
// and "somesalt".
func TestReferenceVectors(t *testing.T) {
	for _, v := range []struct {
		time, memory uint32
		threads      uint8
		want         string
	}{
		{1, 64, 1, "655ad15eac652dc59f7170a7332bf49b8469be1fdb9c28bb"},
		{2, 64, 1, "068d62b26455936aa6ebe60060b0a65870dbfa3ddf8d41f7"},
		{2, 64, 2, "350ac37222f436ccb5c0972f1ebd3bf6b958bf2071841362"},
		{3, 256, 2, "4668d30ac4187e6878eedeacf0fd83c5a0a30db2cc16ef0b"},
	} {
		if got := fmt.Sprintf("%x", IDKey([]byte("password"), []byte("somesalt"), v.time, v.memory, v.threads, 24)); got != v.want {
			t.Errorf("t=%d m=%d p=%d: key %s, want %s", v.time, v.memory, v.threads, got, v.want)
		}
	}
}

// BenchmarkIDKey is one derivation at the vault's cost, side by side with
// x/crypto's. The first derivation in a fresh process is what a process
// server's start, an agent's first registration and a console login pay:
// go test -run '^$' -bench IDKey -benchtime 1x -count 5 ./replication/argon2id/
func BenchmarkIDKey(b *testing.B) {
	pw, salt := []byte("passphrase"), []byte("0123456789abcdef")
	b.Run("huge-pages", func(b *testing.B) {
		for b.Loop() {
			IDKey(pw, salt, 2, 64<<10, 2, 32)
		}
	})
	b.Run("x-crypto", func(b *testing.B) {
		for b.Loop() {
			argon2.IDKey(pw, salt, 2, 64<<10, 2, 32)
		}
	})
}
