// Package pki is the asr server's own certificate authority: created at first
// start, it signs the server's TLS certificate and the client certificates
// agents receive when they register. Agents pin the CA; every data connection
// is mutual TLS against it.
package pki

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/store/atomicfile"
)

// CA is a loaded certificate authority.
type CA struct {
	Cert    *x509.Certificate
	CertPEM []byte
	key     crypto.Signer
}

// File names inside the data directory.
const (
	CAFile         = "ca.pem"
	caKeyFile      = "ca-key.pem"
	serverCertFile = "server.pem"
	serverKeyFile  = "server-key.pem"
)

// LoadOrCreate loads the CA and server certificate from dir, creating them on
// first use. hosts are the extra names and addresses the server certificate
// must be valid for (localhost and loopback addresses are always included).
// An existing server certificate that does not cover hosts is re-issued.
func LoadOrCreate(dir string, hosts []string) (*CA, tls.Certificate, error) {
	ca, err := loadCA(dir)
	if errors.Is(err, os.ErrNotExist) {
		ca, err = createCA(dir)
	}
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	names := append([]string{"localhost", "127.0.0.1", "::1"}, hosts...)
	if h, err := os.Hostname(); err == nil && h != "" {
		names = append(names, h)
	}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, serverCertFile), filepath.Join(dir, serverKeyFile))
	if err == nil && covers(cert, names) && cert.Leaf.NotAfter.After(time.Now().Add(30*24*time.Hour)) {
		return ca, cert, nil
	}
	certPEM, keyPEM, err := ca.issue(names[0], names)
	if err != nil {
		return nil, tls.Certificate{}, err
	}
	if err := atomicfile.Write(filepath.Join(dir, serverKeyFile), keyPEM, 0o600); err != nil {
		return nil, tls.Certificate{}, err
	}
	if err := atomicfile.Write(filepath.Join(dir, serverCertFile), certPEM, 0o644); err != nil {
		return nil, tls.Certificate{}, err
	}
	cert, err = tls.X509KeyPair(certPEM, keyPEM)
	return ca, cert, err
}

func covers(cert tls.Certificate, names []string) bool {
	if cert.Leaf == nil {
		return false
	}
	for _, n := range names {
		if cert.Leaf.VerifyHostname(n) != nil {
			return false
		}
	}
	return true
}

func loadCA(dir string) (*CA, error) {
	certPEM, err := os.ReadFile(filepath.Join(dir, CAFile))
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, caKeyFile))
	if err != nil {
		return nil, err
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load CA from %s: %w", dir, err)
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("CA key in %s cannot sign", dir)
	}
	return &CA{Cert: pair.Leaf, CertPEM: certPEM, key: signer}, nil
}

func createCA(dir string) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          randomSerial(),
		Subject:               pkix.Name{CommonName: "asr vault CA", Organization: []string{"asr"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(20, 0, 0),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := atomicfile.Write(filepath.Join(dir, caKeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), 0o600); err != nil {
		return nil, err
	}
	if err := atomicfile.Write(filepath.Join(dir, CAFile), certPEM, 0o644); err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, CertPEM: certPEM, key: key}, nil
}

// SignClient signs a client certificate for the public key in a PEM
// certificate request, with the given common name (the machine id). It
// returns the certificate PEM and its serial number (hex).
func (ca *CA) SignClient(csrPEM []byte, commonName string) ([]byte, string, error) {
	block, _ := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, "", errors.New("certificate request: not a PEM CERTIFICATE REQUEST")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, "", fmt.Errorf("certificate request: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, "", fmt.Errorf("certificate request signature: %w", err)
	}
	serial := randomSerial()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: commonName, Organization: []string{"asr agent"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(10, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, csr.PublicKey, ca.key)
	if err != nil {
		return nil, "", err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), serial.Text(16), nil
}

func (ca *CA) issue(cn string, hosts []string) (certPEM, keyPEM []byte, err error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: randomSerial(),
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"asr"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(5, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		return nil, nil, err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}), nil
}

// Pool returns a cert pool holding only the CA.
func (ca *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(ca.Cert)
	return p
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

func randomSerial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic(err)
	}
	return n
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

// CheckProof compares proofs in constant time.
func CheckProof(got, want []byte) bool { return hmac.Equal(got, want) }
