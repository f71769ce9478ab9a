package enroll_test

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"testing"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
)

// cheapKDF keeps the tests of the proofs' logic fast; the benchmark pays
// the vault's cost.
var cheapKDF = replication.KDFParams{Time: 1, Memory: 64, Threads: 1}

func mustKey(t testing.TB, p replication.KDFParams, pass, salt []byte) enroll.ProofKey {
	t.Helper()
	k, err := enroll.DeriveProofKey(pass, salt, p)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestRegistrationProofs(t *testing.T) {
	salt := enroll.NewSalt()
	nonce, ca, csr := []byte("nonce"), []byte("ca pem"), []byte("csr pem")
	k := mustKey(t, cheapKDF, []byte("pass"), salt)
	// A passphrase file's newline is not part of the passphrase.
	if mustKey(t, cheapKDF, []byte("pass\n"), salt) != k {
		t.Error("the trailing newline changed the key")
	}
	if mustKey(t, cheapKDF, []byte("pass"), enroll.NewSalt()) == k {
		t.Error("another salt gave the same key")
	}
	if mustKey(t, replication.KDFParams{Time: 2, Memory: 64, Threads: 1}, []byte("pass"), salt) == k {
		t.Error("another cost gave the same key")
	}
	other := mustKey(t, cheapKDF, []byte("guess"), salt)
	if enroll.CheckProof(enroll.ServerProof(other, nonce, ca), enroll.ServerProof(k, nonce, ca)) {
		t.Error("a wrong passphrase made the server proof")
	}
	if !enroll.CheckProof(enroll.AgentProof(k, nonce, "m1", csr), enroll.AgentProof(k, nonce, "m1", csr)) {
		t.Error("the same agent proof does not check")
	}
	// The proofs cannot stand in for each other, nor for another name.
	if enroll.CheckProof(enroll.AgentProof(k, nonce, "m1", csr), enroll.AgentProof(k, nonce, "m2", csr)) ||
		enroll.CheckProof(enroll.ServerProof(k, nonce, ca), enroll.AgentProof(k, nonce, "", ca)) {
		t.Error("proofs of different things are equal")
	}
}

func TestDeriveProofKeyRefusesAbsurdParameters(t *testing.T) {
	salt := enroll.NewSalt()
	ok := replication.VaultKDF
	for _, tc := range []struct {
		what string
		p    replication.KDFParams
		salt []byte
	}{
		{"memory over 1 GiB", replication.KDFParams{Time: 2, Memory: enroll.MaxKDFMemory + 1, Threads: 2}, salt},
		{"4 GiB of memory", replication.KDFParams{Time: 1, Memory: 4 << 20, Threads: 1}, salt},
		{"no passes", replication.KDFParams{Time: 0, Memory: ok.Memory, Threads: 2}, salt},
		{"too many passes", replication.KDFParams{Time: enroll.MaxKDFTime + 1, Memory: ok.Memory, Threads: 2}, salt},
		{"no lanes", replication.KDFParams{Time: 2, Memory: ok.Memory, Threads: 0}, salt},
		{"too many lanes", replication.KDFParams{Time: 2, Memory: ok.Memory, Threads: 255}, salt},
		{"memory under 8 KiB a lane", replication.KDFParams{Time: 2, Memory: 15, Threads: 2}, salt},
		{"no salt", ok, nil},
		{"short salt", ok, salt[:8]},
		{"long salt", ok, make([]byte, enroll.MaxSaltLen+1)},
	} {
		// Out-of-bounds parameters must be refused before argon2 runs:
		// it would allocate the memory, or panic on zero passes or lanes.
		if _, err := enroll.DeriveProofKey([]byte("pass"), tc.salt, tc.p); !errors.Is(err, enroll.ErrBadKDF) {
			t.Errorf("%s: DeriveProofKey = %v, want ErrBadKDF", tc.what, err)
		}
	}
}

// v1ServerProof is the server proof as it was before the registration key
// was derived with Argon2id: an HMAC keyed by one SHA-256 of the
// passphrase. Kept here only to compare what a guess costs.
func v1ServerProof(passphrase, nonce, caPEM []byte) []byte {
	h := sha256.New()
	h.Write([]byte("asr/register/v1\x00"))
	h.Write(bytes.TrimSpace(passphrase))
	m := hmac.New(sha256.New, h.Sum(nil))
	for _, p := range [][]byte{[]byte("server"), nonce, caPEM} {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(p)))
		m.Write(n[:])
		m.Write(p)
	}
	return m.Sum(nil)
}

// BenchmarkOfflineGuess is what an attacker pays for one passphrase guess
// against a challenge anyone can fetch (nonce, CA, salt, server proof):
// version 1 (HMAC keyed by SHA-256) and now (Argon2id at the vault's cost,
// then the HMAC), side by side in one run.
func BenchmarkOfflineGuess(b *testing.B) {
	nonce, ca := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{'c'}, 600)
	salt := enroll.NewSalt()
	guess := []byte("a-guessed-passphrase")
	b.Run("v1-hmac-sha256", func(b *testing.B) {
		captured := v1ServerProof([]byte("the-passphrase"), nonce, ca)
		for b.Loop() {
			if enroll.CheckProof(captured, v1ServerProof(guess, nonce, ca)) {
				b.Fatal("guessed")
			}
		}
	})
	b.Run("v2-argon2id", func(b *testing.B) {
		captured := enroll.ServerProof(mustKey(b, replication.VaultKDF, []byte("the-passphrase"), salt), nonce, ca)
		for b.Loop() {
			if enroll.CheckProof(captured, enroll.ServerProof(mustKey(b, replication.VaultKDF, guess, salt), nonce, ca)) {
				b.Fatal("guessed")
			}
		}
	})
}
