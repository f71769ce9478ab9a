package replication

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"time"

	"golang.org/x/crypto/argon2"
)

// ErrWrongPassphrase is returned when a passphrase does not open the vault a
// target belongs to.
var ErrWrongPassphrase = errors.New("wrong vault passphrase")

// Vault key derivation: Argon2id, memory-hard, so a stolen vault descriptor
// does not make guessing the passphrase cheap.
const (
	kdfTime    = 2
	kdfMemory  = 64 << 10 // KiB
	kdfThreads = 2
)

// DeriveVaultKey derives the 32-byte vault key from a passphrase and salt.
func DeriveVaultKey(passphrase, salt []byte) []byte {
	return argon2.IDKey(passphrase, salt, kdfTime, kdfMemory, kdfThreads, 32)
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
