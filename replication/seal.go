package replication

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// Encryption at rest. Everything the server writes to a target except the
// replica disks' contents and the vault descriptor is sealed with
// AES-256-GCM under the vault's data key: catalog objects (machines, points,
// group points) and the segments kept for any-point-in-time recovery. The
// data key is random, made with the vault, and stored in the descriptor
// wrapped (AES-256-GCM) by a key derived from the vault passphrase with
// Argon2id, so the passphrase can be checked and the key unwrapped on a
// fresh machine with nothing but the target and the passphrase. Each
// object's key and kind are its additional data: an object copied or moved
// to another key does not open. Replica disks stay plain so that Azure can
// boot them; they rely on the storage's own encryption at rest.

// ErrNotSealed is returned when an object that must be encrypted is not.
var ErrNotSealed = errors.New("object is not encrypted")

var sealMagic = [6]byte{'A', 'S', 'R', 'E', 'N', 'C'}

const sealVersion = 1

// SealedCodec frames objects as PlainCodec does, then encrypts them:
// magic "ASRENC", version u16, 12-byte nonce, AES-256-GCM of the framed
// object with "asr object v1", key and kind as additional data.
type SealedCodec struct {
	aead cipher.AEAD
}

// NewSealedCodec makes a codec for a 32-byte data key.
func NewSealedCodec(dataKey []byte) (*SealedCodec, error) {
	aead, err := newGCM(dataKey)
	if err != nil {
		return nil, err
	}
	return &SealedCodec{aead: aead}, nil
}

func newGCM(key []byte) (cipher.AEAD, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("encryption key of %d bytes, want 32", len(key))
	}
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

func objectAD(key, kind string) []byte {
	return []byte("asr object v1\x00" + key + "\x00" + kind)
}

// Seal frames and encrypts.
func (c *SealedCodec) Seal(key, kind string, plain []byte) ([]byte, error) {
	framed, _ := PlainCodec{}.Seal(key, kind, plain)
	ns := c.aead.NonceSize()
	b := make([]byte, 0, 8+ns+len(framed)+c.aead.Overhead())
	b = append(b, sealMagic[:]...)
	b = binary.LittleEndian.AppendUint16(b, sealVersion)
	nonce := make([]byte, ns)
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	b = append(b, nonce...)
	return c.aead.Seal(b, nonce, framed, objectAD(key, kind)), nil
}

// Open decrypts and unframes. A wrong key, a changed byte or an object
// stored under another key all fail authentication.
func (c *SealedCodec) Open(key, kind string, b []byte) ([]byte, error) {
	if len(b) >= 6 && [6]byte(b[:6]) == objMagic {
		return nil, fmt.Errorf("%s object %s: %w (written outside this vault?)", kind, key, ErrNotSealed)
	}
	ns := c.aead.NonceSize()
	if len(b) < 8+ns+c.aead.Overhead() || [6]byte(b[:6]) != sealMagic {
		return nil, fmt.Errorf("%s object: bad magic: %w", kind, ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint16(b[6:]); v != sealVersion {
		return nil, fmt.Errorf("%s object: encryption version %d not supported: %w", kind, v, ErrCorrupt)
	}
	framed, err := c.aead.Open(nil, b[8:8+ns], b[8+ns:], objectAD(key, kind))
	if err != nil {
		return nil, fmt.Errorf("%s object %s: decryption failed (wrong vault key, damaged, or moved from another key): %w", kind, key, ErrCorrupt)
	}
	return PlainCodec{}.Open(key, kind, framed)
}

func isSealed(b []byte) bool { return len(b) >= 6 && [6]byte(b[:6]) == sealMagic }

// kekFor derives the key-wrapping key from the passphrase-derived vault key.
func kekFor(vaultKey []byte) []byte {
	m := hmac.New(sha256.New, vaultKey)
	m.Write([]byte("asr key wrap v1"))
	return m.Sum(nil)
}

func wrapAD(vaultID string) []byte { return []byte("asr data key v1\x00" + vaultID) }

// descriptorMAC authenticates a vault descriptor's fields.
func descriptorMAC(vaultKey []byte, v VaultInfo) []byte {
	k := hmac.New(sha256.New, vaultKey)
	k.Write([]byte("asr vault mac v1"))
	m := hmac.New(sha256.New, k.Sum(nil))
	enc := 0
	if v.Encrypting {
		enc = 1
	}
	fmt.Fprintf(m, "%q %d %x %x %x %d", v.ID, v.Created.UnixNano(), v.Salt, v.Verifier, v.WrappedKey, enc)
	return m.Sum(nil)
}

// seal sets the descriptor's MAC.
func (v *VaultInfo) seal(vaultKey []byte) { v.MAC = descriptorMAC(vaultKey, *v) }

// wrapDataKey seals a data key under the vault key.
func wrapDataKey(vaultKey, dataKey []byte, vaultID string) ([]byte, error) {
	aead, err := newGCM(kekFor(vaultKey))
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return aead.Seal(nonce, nonce, dataKey, wrapAD(vaultID)), nil
}

// DataKey checks the passphrase and the descriptor's MAC and unwraps the
// vault's data key. A vault made before encryption existed has none (nil,
// nil): OpenVault converts such a vault.
func (v VaultInfo) DataKey(passphrase []byte) ([]byte, error) {
	vk, err := v.Check(passphrase)
	if err != nil {
		return nil, err
	}
	return v.unwrap(vk)
}

// unwrap checks the MAC and unwraps the data key with the vault key (the
// passphrase already checked: Argon2id runs once per open).
func (v VaultInfo) unwrap(vk []byte) ([]byte, error) {
	if v.WrappedKey == nil && v.MAC == nil {
		return nil, nil
	}
	if !hmac.Equal(v.MAC, descriptorMAC(vk, v)) {
		return nil, fmt.Errorf("vault %s: the descriptor on the target was changed by someone without the passphrase (MAC mismatch): %w", v.ID, ErrCorrupt)
	}
	aead, err := newGCM(kekFor(vk))
	if err != nil {
		return nil, err
	}
	ns := aead.NonceSize()
	if len(v.WrappedKey) < ns {
		return nil, fmt.Errorf("vault %s: wrapped data key too short: %w", v.ID, ErrCorrupt)
	}
	k, err := aead.Open(nil, v.WrappedKey[:ns], v.WrappedKey[ns:], wrapAD(v.ID))
	if err != nil {
		return nil, fmt.Errorf("vault %s: the data key does not unwrap: %w", v.ID, ErrCorrupt)
	}
	return k, nil
}

// OpenVault checks the passphrase against the target's vault descriptor and
// returns a catalog whose objects are sealed with the vault's data key. A
// vault made before encryption existed is converted first (encryptVault).
func OpenVault(ctx context.Context, t Target, passphrase []byte) (*Catalog, VaultInfo, error) {
	cat := &Catalog{T: t, Codec: PlainCodec{}}
	v, err := cat.Vault(ctx)
	if err != nil {
		return nil, v, err
	}
	vk, err := v.Check(passphrase)
	if err != nil {
		return nil, v, err
	}
	key, err := v.unwrap(vk)
	if err != nil {
		return nil, v, err
	}
	if key == nil || v.Encrypting {
		if key, err = encryptVault(ctx, cat, &v, vk); err != nil {
			return nil, v, fmt.Errorf("encrypt the vault's objects: %w", err)
		}
	}
	codec, err := NewSealedCodec(key)
	if err != nil {
		return nil, v, err
	}
	cat.Codec = codec
	return cat, v, nil
}

// encryptVault converts a vault made before encryption existed: it gives
// the vault a data key (saved first, marked Encrypting, so a conversion cut
// short goes on with the same key), seals every plain object in place, and
// clears the mark. vk is the checked vault key. It returns the data key.
func encryptVault(ctx context.Context, cat *Catalog, v *VaultInfo, vk []byte) ([]byte, error) {
	key, err := v.unwrap(vk)
	if err != nil {
		return nil, err
	}
	if key == nil {
		// A descriptor with no key over a target holding sealed objects
		// was damaged or replaced: a new key would lose every object.
		objs, err := cat.T.ListObjects(ctx, "")
		if err != nil {
			return nil, err
		}
		for _, o := range objs {
			if o.Key == vaultKey {
				continue
			}
			b, err := cat.T.GetObject(ctx, o.Key)
			if err != nil {
				return nil, err
			}
			if isSealed(b) {
				return nil, fmt.Errorf("vault %s: the descriptor has no data key but %s is encrypted: the descriptor was damaged or replaced; restore it: %w", v.ID, o.Key, ErrCorrupt)
			}
		}
		key = make([]byte, 32)
		if _, err := rand.Read(key); err != nil {
			return nil, err
		}
		if v.WrappedKey, err = wrapDataKey(vk, key, v.ID); err != nil {
			return nil, err
		}
		v.Encrypting = true
		v.seal(vk)
		if err := cat.PutVault(ctx, *v); err != nil {
			return nil, err
		}
	}
	codec, err := NewSealedCodec(key)
	if err != nil {
		return nil, err
	}
	objs, err := cat.T.ListObjects(ctx, "")
	if err != nil {
		return nil, err
	}
	for _, o := range objs {
		if o.Key == vaultKey {
			continue
		}
		b, err := cat.T.GetObject(ctx, o.Key)
		if err != nil {
			return nil, err
		}
		if isSealed(b) {
			continue
		}
		kind := "segment"
		if bytes.HasPrefix(b, objMagic[:]) {
			kind = frameKind(b)
			if b, err = (PlainCodec{}).Open(o.Key, kind, b); err != nil {
				return nil, fmt.Errorf("%s: %w", o.Key, err)
			}
		} else if !strings.Contains(o.Key, "/segments/") {
			return nil, fmt.Errorf("%s: neither a catalog object nor a segment: %w", o.Key, ErrCorrupt)
		}
		sealed, err := codec.Seal(o.Key, kind, b)
		if err != nil {
			return nil, err
		}
		if err := cat.T.PutObject(ctx, o.Key, sealed); err != nil {
			return nil, err
		}
	}
	v.Encrypting = false
	v.seal(vk)
	return key, cat.PutVault(ctx, *v)
}

// frameKind reads the kind out of a PlainCodec frame ("" if it is too short).
func frameKind(b []byte) string {
	if len(b) < 10 {
		return ""
	}
	kl := int(binary.LittleEndian.Uint16(b[8:]))
	if 10+kl > len(b) {
		return ""
	}
	return string(b[10 : 10+kl])
}
