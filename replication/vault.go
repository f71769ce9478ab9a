package replication

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"time"

	"github.com/asrdr/asr/replication/argon2id"
)

// ErrWrongPassphrase is returned when a passphrase does not open the vault a
// target belongs to.
var ErrWrongPassphrase = errors.New("wrong vault passphrase")

// KDFParams are the costs of an Argon2id key derivation. They travel in
// registration challenges, so that an agent derives its key exactly as the
// server did.
type KDFParams struct {
	Time    uint32 `json:"time"`    // passes over the memory
	Memory  uint32 `json:"memory"`  // KiB
	Threads uint8  `json:"threads"` // lanes
}

// VaultKDF is the cost of every key derived from the vault passphrase:
// Argon2id, memory-hard, so that neither a stolen vault descriptor nor a
// captured registration challenge makes guessing the passphrase cheap.
var VaultKDF = KDFParams{Time: 2, Memory: 64 << 10, Threads: 2}

// Key derives a 32-byte key from a passphrase and salt. The parameters must
// be sane (argon2 panics on zero passes or lanes): check any that came from
// the wire first.
func (p KDFParams) Key(passphrase, salt []byte) []byte {
	return argon2id.IDKey(passphrase, salt, p.Time, p.Memory, p.Threads, 32)
}

// DeriveVaultKey derives the 32-byte vault key from a passphrase and salt.
func DeriveVaultKey(passphrase, salt []byte) []byte {
	return VaultKDF.Key(passphrase, salt)
}

func verifier(key []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write([]byte("asr vault verifier v1"))
	return m.Sum(nil)
}

// NewVaultInfo makes the descriptor of a new vault, with a new random data
// key wrapped by the passphrase (seal.go).
func NewVaultInfo(id string, passphrase []byte) (VaultInfo, error) {
	salt := make([]byte, 16)
	rand.Read(salt)
	vk := DeriveVaultKey(passphrase, salt)
	v := VaultInfo{ID: id, Created: time.Now().UTC(), Salt: salt, Verifier: verifier(vk)}
	dataKey := make([]byte, 32)
	if _, err := rand.Read(dataKey); err != nil {
		return v, err
	}
	var err error
	if v.WrappedKey, err = wrapDataKey(vk, dataKey, id); err != nil {
		return v, err
	}
	v.seal(vk)
	return v, nil
}

// Check verifies a passphrase against the descriptor and returns the vault key.
func (v VaultInfo) Check(passphrase []byte) ([]byte, error) {
	key := DeriveVaultKey(passphrase, v.Salt)
	if !hmac.Equal(verifier(key), v.Verifier) {
		return nil, fmt.Errorf("%w for vault %s", ErrWrongPassphrase, v.ID)
	}
	return key, nil
}
