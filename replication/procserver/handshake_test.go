package procserver

import (
	"bufio"
	"encoding/binary"
	"testing"
	"time"

	"crypto/tls"

	"github.com/asrdr/asr/replication"
)

// helloHeader is a HELLO frame header announcing plen payload bytes.
func helloHeader(plen uint32) []byte {
	var h [replication.FrameHeaderSize]byte
	copy(h[0:], "ASRF")
	h[4], h[5] = replication.ProtocolVersion, byte(replication.FrameHello)
	binary.LittleEndian.PutUint32(h[8:], plen)
	binary.LittleEndian.PutUint32(h[12:], plen)
	binary.LittleEndian.PutUint32(h[32:], replication.Checksum(h[:32]))
	return h[:]
}

// Connections that authenticate and then hold their Hello back are
// bounded per machine (40 of them, each announcing 16 MiB, took a server
// from 31 MB to 695 MB): a third one is told to try again at once, and a
// Hello announcing more than a Hello can hold is refused before its bytes
// are read.
func TestUnfinishedHellosBounded(t *testing.T) {
	r := mustTLSRig(t)
	dial := func() *tls.Conn {
		t.Helper()
		c, err := tls.Dial("tcp", r.addr, r.client)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	// A 16 MiB Hello: refused from its header.
	c := dial()
	c.Write(helloHeader(16 << 20))
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("the server answered a 16 MiB hello instead of closing")
	}
	// Two connections hold their Hello back (a header only, 512 bytes
	// announced, none sent).
	for i := 0; i < 2; i++ {
		c := dial()
		c.Write(helloHeader(512)[:10])
	}
	waitFor(t, "two hellos pending", func() bool {
		r.s.mu.Lock()
		defer r.s.mu.Unlock()
		return r.s.helloing[machineID] == 2
	})
	c = dial()
	c.SetReadDeadline(time.Now().Add(30 * time.Second))
	f, _, err := replication.ReadFrame(bufio.NewReader(c), nil)
	if err != nil || f.Type != replication.FrameError {
		t.Fatalf("third pending hello: %v %v; want an ERROR frame", f.Type, err)
	}
	var e replication.ErrorMessage
	replication.DecodeJSON(&f, &e)
	if e.Fatal {
		t.Fatalf("the refusal is fatal (%q): the agent would wait 30 s", e.Message)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(2 * time.Minute)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("gave up waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
