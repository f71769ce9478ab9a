// Package enroll is what both sides of an agent's registration share: the
// wire types of the challenge and the registration, the passphrase proofs
// each side shows the other, and the key, certificate-request and CA-pool
// helpers an agent needs to pin the vault's CA. The server (which issues the
// certificates, in server/pki) and the agent both import it; neither
// imports the other.
package enroll

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"

	"github.com/asrdr/asr/replication"
)

// Challenge is the server's answer to GET /api/v1/agents/challenge.
type Challenge struct {
	Nonce    []byte `json:"nonce"`
	CAPEM    string `json:"ca_pem"`
	Proof    []byte `json:"proof"`     // ServerProof(key, nonce, ca_pem)
	DataPort int    `json:"data_port"` // port of the data listener
	// Salt and KDF are what the proof key is derived with:
	// key = DeriveProofKey(passphrase, salt, kdf).
	Salt []byte                `json:"salt"`
	KDF  replication.KDFParams `json:"kdf"`
}

// RegisterRequest is the body of POST /api/v1/agents/register.
type RegisterRequest struct {
	Name   string `json:"name"`
	CSRPEM string `json:"csr_pem"`
	Nonce  []byte `json:"nonce"`
	Proof  []byte `json:"proof"` // AgentProof(key, nonce, name, csr_pem)
}

// RegisterResponse answers a successful registration.
type RegisterResponse struct {
	MachineID string `json:"machine_id"`
	CertPEM   string `json:"cert_pem"`
	DataPort  int    `json:"data_port"`
}

// NewKeyAndCSR creates a client key and a certificate request for it (agent side).
func NewKeyAndCSR(cn string) (keyPEM, csrPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}}, key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// PoolFromPEM parses PEM certificates into a pool.
func PoolFromPEM(p []byte) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(p) {
		return nil, errors.New("no certificate in PEM data")
	}
	return pool, nil
}

// Registration proofs. An agent registers by proving it knows the vault
// passphrase, and the server proves the same before the agent pins its CA, so
// neither side sends the passphrase and a man in the middle learns nothing
// it can use. Anyone may fetch a challenge with its server proof, so the
// proofs are keyed by an Argon2id of the passphrase at the vault's cost
// (replication.VaultKDF) with a per-vault registration salt: each offline
// guess costs one Argon2id, not one SHA-256 as in version 1. The server
// derives the key once at start, the agent once per try.

// ProofKey is the key registration proofs are made with. It is an array, not
// a slice, so that a passphrase cannot be passed where the key is wanted.
type ProofKey [32]byte

// ErrBadKDF is returned for key-derivation parameters or a salt outside the
// bounds an agent accepts from a server.
var ErrBadKDF = errors.New("registration key parameters out of bounds")

// Bounds on what a challenge may make an agent spend on one derivation. A
// server may raise its cost up to these, never past them: an impostor must
// not be able to make an agent allocate without limit.
const (
	MaxKDFMemory  = 1 << 20 // KiB (1 GiB)
	MaxKDFTime    = 16
	MaxKDFThreads = 16
	MinSaltLen    = 16
	MaxSaltLen    = 64
)

// NewSalt makes a registration salt.
func NewSalt() []byte {
	b := make([]byte, MinSaltLen)
	rand.Read(b)
	return b
}

// CheckKDF checks key-derivation parameters and a salt against the bounds.
func CheckKDF(p replication.KDFParams, salt []byte) error {
	switch {
	case p.Time < 1 || p.Time > MaxKDFTime:
		return fmt.Errorf("%w: %d passes (want 1 to %d)", ErrBadKDF, p.Time, MaxKDFTime)
	case p.Threads < 1 || p.Threads > MaxKDFThreads:
		return fmt.Errorf("%w: %d lanes (want 1 to %d)", ErrBadKDF, p.Threads, MaxKDFThreads)
	case p.Memory < 8*uint32(p.Threads) || p.Memory > MaxKDFMemory:
		return fmt.Errorf("%w: %d KiB of memory (want %d to %d)", ErrBadKDF, p.Memory, 8*uint32(p.Threads), MaxKDFMemory)
	case len(salt) < MinSaltLen || len(salt) > MaxSaltLen:
		return fmt.Errorf("%w: %d-byte salt (want %d to %d)", ErrBadKDF, len(salt), MinSaltLen, MaxSaltLen)
	}
	return nil
}

// DeriveProofKey derives the registration proof key from the passphrase
// (surrounding white space ignored: passphrase files end in a newline), the
// vault's registration salt and the parameters, after checking them.
func DeriveProofKey(passphrase, salt []byte, p replication.KDFParams) (ProofKey, error) {
	var k ProofKey
	if err := CheckKDF(p, salt); err != nil {
		return k, err
	}
	copy(k[:], p.Key(bytes.TrimSpace(passphrase), salt))
	return k, nil
}

func proof(key ProofKey, parts ...[]byte) []byte {
	m := hmac.New(sha256.New, key[:])
	for _, p := range append([][]byte{[]byte("asr/register/v2")}, parts...) {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(p)))
		m.Write(n[:])
		m.Write(p)
	}
	return m.Sum(nil)
}

// ServerProof is what the server shows for a registration nonce and its CA.
func ServerProof(key ProofKey, nonce, caPEM []byte) []byte {
	return proof(key, []byte("server"), nonce, caPEM)
}

// AgentProof is what an agent shows for a nonce, its machine name and its
// certificate request.
func AgentProof(key ProofKey, nonce []byte, name string, csrPEM []byte) []byte {
	return proof(key, []byte("agent"), nonce, []byte(name), csrPEM)
}

// ProcessServerProof is what a scale-out process server shows for a nonce,
// its name, its data address and its certificate request: a proof of
// another kind than an agent's, so neither passes for the other.
func ProcessServerProof(key ProofKey, nonce []byte, name, dataAddr string, csrPEM []byte) []byte {
	return proof(key, []byte("process-server"), nonce, []byte(name), []byte(dataAddr), csrPEM)
}

// ProcessServerRegisterRequest is the body of POST
// /api/v1/process-servers/register.
type ProcessServerRegisterRequest struct {
	Name     string `json:"name"`
	DataAddr string `json:"data_addr"` // host:port its agents connect to
	CSRPEM   string `json:"csr_pem"`
	Nonce    []byte `json:"nonce"`
	Proof    []byte `json:"proof"` // ProcessServerProof(key, nonce, name, data_addr, csr_pem)
}

// ProcessServerRegisterResponse answers a process server's registration.
type ProcessServerRegisterResponse struct {
	CertPEM string `json:"cert_pem"`
	// Target is the configuration server's target URL (no credentials:
	// an Azure target's come from the process server's environment).
	Target  string `json:"target"`
	VaultID string `json:"vault_id"`
}

// ProcessServerCN is the common name of a process server's client
// certificate: a machine id (hex) or a machine name never holds ':'.
func ProcessServerCN(name string) string { return "ps:" + name }

// ClientCertALPN is a TLS protocol name a process server or an agent offers
// (with http/1.1, which is what the server picks) when it calls the
// configuration server's control API with its client certificate: the
// server asks for a client certificate only on such connections (a browser
// is never asked).
const ClientCertALPN = "asr-client-cert/1"

// DataAddress answers an agent's GET /api/v1/agents/data-address (mutual
// TLS): where its machine's process server is. An empty DataAddr means the
// configuration server's built-in one, at the address the agent has.
type DataAddress struct {
	ProcessServer string `json:"process_server"`
	DataAddr      string `json:"data_addr,omitempty"`
}

// CheckProof compares proofs in constant time.
func CheckProof(got, want []byte) bool { return hmac.Equal(got, want) }
