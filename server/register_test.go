package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/server"
)

// enroller registers by hand, as an agent does, from a chosen source
// address: tests can send what an agent never would (a bad name) and come
// from 127.0.0.2 as well as 127.0.0.1.
type enroller struct {
	t    *testing.T
	url  string
	pass []byte
	c    *http.Client
	key  *enroll.ProofKey // derived at the first challenge: one Argon2id per enroller
}

func newEnroller(t *testing.T, r *rig, localIP string) *enroller {
	t.Helper()
	pass, err := os.ReadFile(filepath.Join(r.dir, "srv", server.PassphraseFile))
	if err != nil {
		t.Fatal(err)
	}
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(localIP)}}
	if c, err := d.Dial("tcp", r.srv.Addr().String()); err != nil {
		// On Linux every 127.0.0.0/8 address is the loopback's: this
		// fails rather than let the per-source tests pass untested.
		t.Fatalf("cannot connect from %s: %v", localIP, err)
	} else {
		c.Close()
	}
	tr := &http.Transport{DialContext: d.DialContext, TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}
	t.Cleanup(tr.CloseIdleConnections)
	return &enroller{t: t, url: r.srv.URL(), pass: pass, c: &http.Client{Transport: tr}}
}

func (e *enroller) do(method, path string, in any) (int, []byte) {
	e.t.Helper()
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			e.t.Fatal(err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, e.url+path, body)
	if err != nil {
		e.t.Fatal(err)
	}
	resp, err := e.c.Do(req)
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return resp.StatusCode, b
}

// challenge fetches a challenge, returning its status.
func (e *enroller) challenge() (enroll.Challenge, int) {
	e.t.Helper()
	var ch enroll.Challenge
	st, b := e.do(http.MethodGet, "/api/v1/agents/challenge", nil)
	if st == http.StatusOK {
		if err := json.Unmarshal(b, &ch); err != nil {
			e.t.Fatal(err)
		}
	}
	return ch, st
}

// mustChallenge fetches a challenge and checks the server's proof.
func (e *enroller) mustChallenge() enroll.Challenge {
	e.t.Helper()
	ch, st := e.challenge()
	if st != http.StatusOK {
		e.t.Fatalf("challenge: HTTP %d", st)
	}
	if e.key == nil {
		k, err := enroll.DeriveProofKey(e.pass, ch.Salt, ch.KDF)
		if err != nil {
			e.t.Fatal(err)
		}
		e.key = &k
	}
	if !enroll.CheckProof(ch.Proof, enroll.ServerProof(*e.key, ch.Nonce, []byte(ch.CAPEM))) {
		e.t.Fatal("the server's proof does not check")
	}
	return ch
}

// register answers a challenge with a valid proof for name, returning the
// status and the body.
func (e *enroller) register(ch enroll.Challenge, name string) (int, string) {
	e.t.Helper()
	_, csr, err := enroll.NewKeyAndCSR("x")
	if err != nil {
		e.t.Fatal(err)
	}
	st, b := e.do(http.MethodPost, "/api/v1/agents/register", enroll.RegisterRequest{Name: name, CSRPEM: string(csr),
		Nonce: ch.Nonce, Proof: enroll.AgentProof(*e.key, ch.Nonce, name, csr)})
	return st, string(b)
}

// The nonce table once held 10,000 challenges from anyone and refused more
// for five minutes: one source could block every registration.
func TestChallengeFloodFromOneSourceBlocksNoOther(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	r := startServer(t, dir)
	// The flood is 10,100 HTTPS requests: on a loaded machine they took
	// six minutes, past a challenge's 5, and the early one expired. What
	// is tested is eviction, not expiry (TestNonceTableExpiry has that).
	server.SetNonceTTL(r.srv, time.Hour)
	legit := newEnroller(t, r, "127.0.0.1")
	flood := newEnroller(t, r, "127.0.0.2")
	early := legit.mustChallenge() // fetched before the flood, answered after it

	// Well past the 10,000 challenges the table once held in all.
	refused := 0
	for range 10100 {
		if _, st := flood.challenge(); st != http.StatusOK {
			refused++
		}
	}
	if refused > 0 {
		t.Errorf("%d of the flood's challenges refused: a new challenge evicts, it is never refused", refused)
	}
	late, st := legit.challenge()
	if st != http.StatusOK {
		t.Fatalf("a challenge from another source after the flood: HTTP %d", st)
	}
	if st, body := legit.register(early, "vm-early"); st != http.StatusOK {
		t.Fatalf("a challenge from another source, answered after the flood: HTTP %d %s", st, body)
	}
	if st, body := legit.register(late, "vm-late"); st != http.StatusOK {
		t.Fatalf("a challenge from another source, fetched after the flood: HTTP %d %s", st, body)
	}
	// A challenge is single use.
	if st, body := legit.register(early, "vm-again"); st != http.StatusConflict {
		t.Errorf("a used challenge answered again: HTTP %d %s, want 409", st, body)
	}

	// And a real agent registers.
	disk := filepath.Join(dir, "d.img")
	mustDisk(t, disk, 1<<20, 1)
	a, err := agent.New(context.Background(), r.agentConfig("vm1", agent.DiskSpec{Name: "d", Path: disk}))
	if err != nil {
		t.Fatalf("an agent after the flood: %v", err)
	}
	a.Close()
}

// Machine names were checked only by the agent: the server took anything.
func TestRegisterRefusesBadMachineNames(t *testing.T) {
	t.Parallel()
	r := startServer(t, t.TempDir())
	e := newEnroller(t, r, "127.0.0.1")
	if st, body := e.register(e.mustChallenge(), "m1"); st != http.StatusOK {
		t.Fatalf("register m1: HTTP %d %s", st, body)
	}
	for _, name := range []string{
		"a/b",
		"x'; DROP TABLE machines;--",
		"\x1b[2J\x1b[31mred",
		"m1 ", // beside m1, printed the same
		"",
		"-m1",
		"..",
		strings.Repeat("m", 65),
	} {
		st, body := e.register(e.mustChallenge(), name)
		if st != http.StatusBadRequest || !strings.Contains(body, "machine name") || !strings.Contains(body, "nothing was registered") {
			t.Errorf("register %q: HTTP %d %s, want 400 with a clear message", name, st, body)
		}
	}
	ms, err := r.srv.Machines(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, m := range ms {
		names = append(names, m.Name)
	}
	if len(names) != 1 || names[0] != "m1" {
		t.Errorf("machines after the refused names: %q, want m1 alone", names)
	}
}
