package nbd

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func mustReadFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRoundTripFileBackend(t *testing.T) {
	const size = 40 << 20 // larger than MaxPayload, to exercise client splitting
	fb, path := mustFileBackend(t, size)
	lookup, list := exports(map[string]Backend{"disk": fb})
	logger, _ := newTestLogger()
	addr := mustServe(t, &Server{Lookup: lookup, List: list, Logger: logger})
	c := mustDial(t, addr, "disk")
	if c.Size() != size {
		t.Fatalf("Size = %d, want %d", c.Size(), size)
	}

	r := rand.New(rand.NewPCG(1, 2))
	model := make([]byte, size)
	check := func(what string) {
		t.Helper()
		got := make([]byte, size)
		if err := c.ReadAt(got, 0); err != nil {
			t.Fatalf("%s: ReadAt: %v", what, err)
		}
		if !bytes.Equal(got, model) {
			t.Fatalf("%s: read back differs from model", what)
		}
		if err := c.Flush(); err != nil {
			t.Fatalf("%s: Flush: %v", what, err)
		}
		if !bytes.Equal(mustReadFile(t, path), model) {
			t.Fatalf("%s: backing file differs from model", what)
		}
	}

	writes := []struct{ off, n int64 }{
		{0, 4096}, {4096, 512}, {1, 1}, {12345, 77777}, {size - 3, 3},
		{5 << 20, MaxPayload + 4097}, // split into two requests
	}
	for i, w := range writes {
		p := randBytes(r, int(w.n))
		var err error
		if i%2 == 0 {
			err = c.WriteAt(p, w.off)
		} else {
			err = c.WriteAtFUA(p, w.off)
		}
		if err != nil {
			t.Fatalf("write %d+%d: %v", w.off, w.n, err)
		}
		copy(model[w.off:], p)
	}
	check("after writes")

	for _, z := range []struct{ off, n int64 }{{100, 1000}, {6 << 20, 3 << 20}, {size - 4096, 4096}} {
		if err := c.WriteZeroes(z.off, z.n); err != nil {
			t.Fatalf("WriteZeroes %d+%d: %v", z.off, z.n, err)
		}
		clear(model[z.off : z.off+z.n])
	}
	check("after write zeroes")

	// Trimmed contents are undefined; rewrite the range afterwards so the
	// model stays exact.
	if err := c.Trim(1<<20, 1<<20); err != nil {
		t.Fatalf("Trim: %v", err)
	}
	p := randBytes(r, 1<<20)
	if err := c.WriteAt(p, 1<<20); err != nil {
		t.Fatal(err)
	}
	copy(model[1<<20:], p)
	check("after trim and rewrite")

	// Zero-length operations are no-ops.
	if err := c.ReadAt(nil, size); err != nil {
		t.Fatalf("empty ReadAt: %v", err)
	}
	if err := c.WriteAt(nil, 0); err != nil {
		t.Fatalf("empty WriteAt: %v", err)
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := c.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrClosed) {
		t.Fatalf("ReadAt after Close: %v, want ErrClosed", err)
	}
}

func TestOutOfRange(t *testing.T) {
	const size = 1 << 20
	mb := newMemBackend(size)
	lookup, list := exports(map[string]Backend{"disk": mb})
	logger, _ := newTestLogger()
	addr := mustServe(t, &Server{Lookup: lookup, List: list, Logger: logger})
	c := mustDial(t, addr, "disk")

	cases := []struct {
		name string
		op   func() error
		want Errno
	}{
		{"read past end", func() error { return c.ReadAt(make([]byte, 2), size-1) }, EINVAL},
		{"read at end", func() error { return c.ReadAt(make([]byte, 1), size) }, EINVAL},
		{"read far", func() error { return c.ReadAt(make([]byte, 1), 1<<62) }, EINVAL},
		{"write past end", func() error { return c.WriteAt(make([]byte, 4096), size-4095) }, ENOSPC},
		{"write far", func() error { return c.WriteAt(make([]byte, 1), 1<<62) }, ENOSPC},
		{"zeroes past end", func() error { return c.WriteZeroes(size-1, 2) }, ENOSPC},
		{"trim past end", func() error { return c.Trim(size, 1) }, EINVAL},
		{"negative offset", func() error { return c.ReadAt(make([]byte, 1), -1) }, EINVAL},
	}
	for _, tc := range cases {
		err := tc.op()
		if !errors.Is(err, tc.want) {
			t.Errorf("%s: err = %v, want %v", tc.name, err, tc.want)
		}
	}
	// The connection survives all of that, and the last byte is usable.
	if err := c.WriteAt([]byte{7}, size-1); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1)
	if err := c.ReadAt(got, size-1); err != nil || got[0] != 7 {
		t.Fatalf("ReadAt last byte = %v, %v", got, err)
	}
	mb.assertClean(t)
}

func TestRawRequests(t *testing.T) {
	const size = 1 << 20
	mb := newMemBackend(size)
	lookup, list := exports(map[string]Backend{"disk": mb})
	logger, _ := newTestLogger()
	addr := mustServe(t, &Server{Lookup: lookup, List: list, Logger: logger})
	r := dialRaw(t, addr)
	r.goExport("disk")

	payload := bytes.Repeat([]byte{0xab}, 4096)
	steps := []struct {
		name                string
		flags, typ          uint16
		off                 uint64
		length              uint32
		payload             []byte
		want                Errno
		wantData            []byte
		checkMemAt, memWant int
	}{
		{name: "zero-length read", typ: cmdRead, off: 0, want: 0},
		{name: "zero-length read at end", typ: cmdRead, off: size, want: 0},
		{name: "zero-length write", typ: cmdWrite, off: 10, want: 0},
		{name: "zero-length trim", typ: cmdTrim, off: 10, want: 0},
		{name: "zero-length zeroes", typ: cmdWriteZeroes, off: 10, want: 0},
		{name: "flush", typ: cmdFlush, want: 0},
		{name: "flush with fua", flags: cmdFlagFUA, typ: cmdFlush, want: 0},
		{name: "cache", typ: 5, off: 0, length: 4096, want: EINVAL},
		{name: "block status", typ: 7, off: 0, length: 4096, want: EINVAL},
		{name: "unknown command", typ: 0xffff, off: 0, length: 10, want: EINVAL},
		{name: "read with DF", flags: 1 << 2, typ: cmdRead, length: 10, want: EINVAL},
		{name: "write with bad flags stays in sync", flags: 1 << 7, typ: cmdWrite, off: 0, length: 4096, payload: payload, want: EINVAL},
		{name: "write with NO_HOLE", flags: cmdFlagNoHole, typ: cmdWrite, length: 4096, payload: payload, want: EINVAL},
		{name: "zeroes with NO_HOLE and FUA", flags: cmdFlagNoHole | cmdFlagFUA, typ: cmdWriteZeroes, length: 4096, want: 0},
		{name: "zeroes with FAST_ZERO", flags: 1 << 4, typ: cmdWriteZeroes, length: 4096, want: EINVAL},
		{name: "out-of-range write stays in sync", typ: cmdWrite, off: size - 100, length: 4096, payload: payload, want: ENOSPC},
		{name: "oversize read", typ: cmdRead, off: 0, length: MaxPayload + 1, want: EINVAL},
		{name: "trim longer than max payload", typ: cmdTrim, off: 0, length: size, want: 0},
		{name: "write", flags: cmdFlagFUA, typ: cmdWrite, off: 8192, length: 4096, payload: payload, want: 0},
		{name: "read back", typ: cmdRead, off: 8190, length: 4, want: 0, wantData: []byte{0, 0, 0xab, 0xab}},
	}
	for i, s := range steps {
		h := uint64(1000 + i)
		r.sendReq(s.flags, s.typ, h, s.off, s.length, s.payload)
		errno, gotH := r.readReply()
		if gotH != h || errno != s.want {
			t.Fatalf("%s: reply handle %d errno %d, want %d errno %d", s.name, gotH, errno, h, s.want)
		}
		if errno == 0 && s.typ == cmdRead {
			data := r.read(int(s.length))
			if s.wantData != nil && !bytes.Equal(data, s.wantData) {
				t.Fatalf("%s: data % x, want % x", s.name, data, s.wantData)
			}
		}
	}
	if mb.bytes(0, 1) != "\x00" {
		t.Fatalf("rejected write reached the backend")
	}
	// NBD_CMD_DISC: the server closes without replying.
	r.sendReq(0, cmdDisc, 1, 0, 0, nil)
	r.expectClosed()
	mb.assertClean(t)
}

func TestHandshakeOptions(t *testing.T) {
	disk := newMemBackend(1 << 20)
	lookup, list := exports(map[string]Backend{"disk": disk})
	logger, _ := newTestLogger()
	addr := mustServe(t, &Server{Lookup: lookup, List: list, Logger: logger})

	t.Run("list info unsupported then go", func(t *testing.T) {
		r := dialRaw(t, addr)
		r.greet(flagCFixedNewstyle | flagCNoZeroes)

		r.sendOpt(optList, nil)
		rep := r.readOptReply()
		if rep.typ != repServer || be.Uint32(rep.data) != 4 || string(rep.data[4:]) != "disk" {
			t.Fatalf("LIST reply %#x % x", rep.typ, rep.data)
		}
		if rep := r.readOptReply(); rep.typ != repAck {
			t.Fatalf("LIST end %#x", rep.typ)
		}
		r.sendOpt(optList, []byte("x"))
		if rep := r.readOptReply(); rep.typ != repErrInvalid {
			t.Fatalf("LIST with data: %#x", rep.typ)
		}

		for _, opt := range []uint32{optStructuredReply, optStartTLS, 9, 10, 11, 4, 1234, 0} {
			r.sendOpt(opt, []byte("whatever"))
			rep := r.readOptReply()
			if rep.opt != opt || rep.typ != repErrUnsup {
				t.Fatalf("option %d: reply opt %d type %#x, want ERR_UNSUP", opt, rep.opt, rep.typ)
			}
		}

		r.sendOpt(optInfo, infoRequest("nope"))
		if rep := r.readOptReply(); rep.typ != repErrUnknown {
			t.Fatalf("INFO unknown export: %#x", rep.typ)
		}
		r.sendOpt(optGo, infoRequest("nope"))
		if rep := r.readOptReply(); rep.typ != repErrUnknown {
			t.Fatalf("GO unknown export: %#x", rep.typ)
		}
		for _, bad := range [][]byte{
			{0, 0, 0},
			{0, 0, 0, 9, 'd', 0, 0},        // name longer than the data
			{0, 0, 0, 0, 0, 2, 0, 3},       // two infos promised, one sent
			{0, 0, 0, 0, 0, 0, 0, 3},       // trailing bytes
			{0xff, 0xff, 0xff, 0xff, 0, 0}, // huge name length
		} {
			r.sendOpt(optInfo, bad)
			if rep := r.readOptReply(); rep.typ != repErrInvalid {
				t.Fatalf("INFO % x: %#x, want ERR_INVALID", bad, rep.typ)
			}
		}

		r.sendOpt(optInfo, infoRequest("disk", infoBlockSize, infoName, 0x7777))
		var sawExport, sawBlock, sawName bool
		for {
			rep := r.readOptReply()
			if rep.typ == repAck {
				break
			}
			if rep.typ != repInfo {
				t.Fatalf("INFO reply %#x", rep.typ)
			}
			switch be.Uint16(rep.data) {
			case infoExport:
				sawExport = true
				if len(rep.data) != 12 || be.Uint64(rep.data[2:]) != 1<<20 || be.Uint16(rep.data[10:]) != serverTransmissionFlags {
					t.Fatalf("INFO_EXPORT % x", rep.data)
				}
			case infoBlockSize:
				sawBlock = true
				if len(rep.data) != 14 || be.Uint32(rep.data[2:]) != 1 || be.Uint32(rep.data[6:]) != 4096 || be.Uint32(rep.data[10:]) != 32<<20 {
					t.Fatalf("INFO_BLOCK_SIZE % x", rep.data)
				}
			case infoName:
				sawName = true
				if string(rep.data[2:]) != "disk" {
					t.Fatalf("INFO_NAME %q", rep.data[2:])
				}
			default:
				t.Fatalf("unrequested info % x", rep.data)
			}
		}
		if !sawExport || !sawBlock || !sawName {
			t.Fatalf("INFO missing replies: export %v block %v name %v", sawExport, sawBlock, sawName)
		}

		r.sendOpt(optGo, infoRequest("disk"))
		if rep := r.readOptReply(); rep.typ != repInfo || be.Uint16(rep.data) != infoExport {
			t.Fatalf("GO first reply %#x % x", rep.typ, rep.data)
		}
		if rep := r.readOptReply(); rep.typ != repAck {
			t.Fatalf("GO end %#x", rep.typ)
		}
		r.sendReq(0, cmdRead, 9, 0, 1, nil)
		r.expectReply(9, 0)
		r.read(1)
	})

	for _, noZeroes := range []bool{false, true} {
		t.Run(fmt.Sprintf("export name no_zeroes=%v", noZeroes), func(t *testing.T) {
			r := dialRaw(t, addr)
			cflags := uint32(flagCFixedNewstyle)
			if noZeroes {
				cflags |= flagCNoZeroes
			}
			r.greet(cflags)
			r.sendOpt(optExportName, []byte("disk"))
			n := 134
			if noZeroes {
				n = 10
			}
			rep := r.read(n)
			if be.Uint64(rep) != 1<<20 || be.Uint16(rep[8:]) != serverTransmissionFlags {
				t.Fatalf("EXPORT_NAME reply % x", rep[:10])
			}
			if slices.ContainsFunc(rep[10:], func(b byte) bool { return b != 0 }) {
				t.Fatalf("padding not zero")
			}
			r.sendReq(0, cmdFlush, 5, 0, 0, nil)
			r.expectReply(5, 0)
		})
	}

	t.Run("default export", func(t *testing.T) {
		r := dialRaw(t, addr)
		reps := r.goExport("", infoName)
		var name string
		for _, rep := range reps {
			if rep.typ == repInfo && be.Uint16(rep.data) == infoName {
				name = string(rep.data[2:])
			}
		}
		if name != "disk" {
			t.Fatalf("default export resolved to %q", name)
		}
	})

	t.Run("abort", func(t *testing.T) {
		r := dialRaw(t, addr)
		r.greet(flagCFixedNewstyle)
		r.sendOpt(optAbort, []byte("ignored"))
		if rep := r.readOptReply(); rep.typ != repAck {
			t.Fatalf("ABORT reply %#x", rep.typ)
		}
		r.expectClosed()
	})

	closing := []struct {
		name string
		send func(r *rawConn)
	}{
		{"unknown client flags", func(r *rawConn) { r.write([]byte{0, 0, 0, 4}) }},
		{"bad option magic", func(r *rawConn) {
			r.greet(flagCFixedNewstyle)
			r.write(make([]byte, 16))
		}},
		{"oversize option", func(r *rawConn) {
			r.greet(flagCFixedNewstyle)
			r.write(appendOption(nil, optInfo, maxOptionLen+1))
		}},
		{"oversize export name", func(r *rawConn) {
			r.greet(flagCFixedNewstyle)
			r.sendOpt(optExportName, make([]byte, maxNameLen+1))
		}},
		{"unknown export name", func(r *rawConn) {
			r.greet(flagCFixedNewstyle)
			r.sendOpt(optExportName, []byte("nope"))
		}},
		{"truncated option", func(r *rawConn) {
			r.greet(flagCFixedNewstyle)
			r.write(appendOption(nil, optInfo, 100))
			r.write([]byte{1, 2, 3})
			r.c.(*net.UnixConn).CloseWrite()
		}},
	}
	for _, tc := range closing {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, addr)
			if tc.name == "unknown client flags" {
				r.read(18)
			}
			tc.send(r)
			r.expectClosed()
		})
	}
}

func TestDefaultExportNeedsSingleExport(t *testing.T) {
	lookup, list := exports(map[string]Backend{"a": newMemBackend(4096), "b": newMemBackend(4096)})
	logger, _ := newTestLogger()
	addr := mustServe(t, &Server{Lookup: lookup, List: list, Logger: logger})
	ctx := context.Background()
	if _, err := Dial(ctx, addr, ""); !errors.Is(err, ErrUnknownExport) {
		t.Fatalf("Dial default with two exports: %v, want ErrUnknownExport", err)
	}
	if _, err := Dial(ctx, addr, "c"); !errors.Is(err, ErrUnknownExport) {
		t.Fatalf("Dial unknown: %v, want ErrUnknownExport", err)
	}
	c := mustDial(t, addr, "b")
	if c.Size() != 4096 {
		t.Fatalf("size %d", c.Size())
	}
}

func TestConcurrentClients(t *testing.T) {
	const (
		clients    = 4
		goroutines = 8
		region     = 1 << 20
		block      = 4096
	)
	fb, path := mustFileBackend(t, clients*region)
	lookup, list := exports(map[string]Backend{"disk": fb})
	logger, _ := newTestLogger()
	addr := mustServe(t, &Server{Lookup: lookup, List: list, Logger: logger, MaxInFlight: 4})

	model := make([]byte, clients*region)
	var wg sync.WaitGroup
	errs := make(chan error, clients*goroutines)
	for ci := range clients {
		c := mustDial(t, addr, "disk")
		for g := range goroutines {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := rand.New(rand.NewPCG(uint64(ci), uint64(g)))
				// Each goroutine owns every goroutines-th block of its
				// client's region, so writes never overlap.
				for b := g; b < region/block; b += goroutines {
					off := int64(ci*region + b*block)
					p := randBytes(r, block)
					copy(model[off:], p) // disjoint ranges: no race
					if err := c.WriteAt(p, off); err != nil {
						errs <- err
						return
					}
					got := make([]byte, block)
					if err := c.ReadAt(got, off); err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(got, p) {
						errs <- fmt.Errorf("client %d: read back at %d differs", ci, off)
						return
					}
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	c := mustDial(t, addr, "disk")
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(mustReadFile(t, path), model) {
		t.Fatal("backing file differs from what the clients wrote")
	}
}

// TestRepliesOutOfOrder shows that a slow request does not hold up the
// ones behind it on the same connection.
func TestRepliesOutOfOrder(t *testing.T) {
	mb := newMemBackend(1 << 20)
	release := make(chan struct{})
	blocked := make(chan struct{})
	hb := &hookBackend{Backend: mb, onRead: func(p []byte, off int64) error {
		if off == 0 {
			close(blocked)
			<-release
		}
		return mb.ReadAt(p, off)
	}}
	lookup, list := exports(map[string]Backend{"disk": hb})
	logger, _ := newTestLogger()
	addr := mustServe(t, &Server{Lookup: lookup, List: list, Logger: logger})
	c := mustDial(t, addr, "disk")

	slow := make(chan error, 1)
	go func() { slow <- c.ReadAt(make([]byte, 10), 0) }()
	<-blocked
	if err := c.WriteAt([]byte("fast"), 4096); err != nil {
		t.Fatalf("fast write while a read is blocked: %v", err)
	}
	select {
	case err := <-slow:
		t.Fatalf("slow read finished early: %v", err)
	default:
	}
	close(release)
	if err := <-slow; err != nil {
		t.Fatal(err)
	}
}

func TestMaxInFlight(t *testing.T) {
	const limit = 3
	mb := newMemBackend(1 << 20)
	var cur, peak atomic.Int32
	gate := make(chan struct{})
	hb := &hookBackend{Backend: mb, onWrite: func(p []byte, off int64, fua bool) error {
		n := cur.Add(1)
		for {
			m := peak.Load()
			if n <= m || peak.CompareAndSwap(m, n) {
				break
			}
		}
		<-gate
		cur.Add(-1)
		return mb.WriteAt(p, off, fua)
	}}
	lookup, list := exports(map[string]Backend{"disk": hb})
	logger, _ := newTestLogger()
	addr := mustServe(t, &Server{Lookup: lookup, List: list, Logger: logger, MaxInFlight: limit})
	c := mustDial(t, addr, "disk")

	var wg sync.WaitGroup
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := c.WriteAt([]byte{byte(i)}, int64(i)); err != nil {
				t.Error(err)
			}
		}()
	}
	deadline := time.Now().Add(5 * time.Second)
	for cur.Load() < limit && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond) // give a broken limit the chance to show
	if got := cur.Load(); got != limit {
		t.Fatalf("%d requests in the backend, want %d", got, limit)
	}
	close(gate)
	wg.Wait()
	if p := peak.Load(); p != limit {
		t.Fatalf("peak concurrency %d, want %d", p, limit)
	}
}

func TestDiscFinishesInFlight(t *testing.T) {
	mb := newMemBackend(1 << 20)
	entered := make(chan struct{})
	release := make(chan struct{})
	hb := &hookBackend{Backend: mb, onWrite: func(p []byte, off int64, fua bool) error {
		close(entered)
		<-release
		return mb.WriteAt(p, off, fua)
	}}
	lookup, list := exports(map[string]Backend{"disk": hb})
	logger, _ := newTestLogger()
	addr := mustServe(t, &Server{Lookup: lookup, List: list, Logger: logger})
	r := dialRaw(t, addr)
	r.goExport("disk")
	r.sendReq(0, cmdWrite, 77, 0, 3, []byte("abc"))
	<-entered
	r.sendReq(0, cmdDisc, 78, 0, 0, nil)
	time.Sleep(20 * time.Millisecond)
	close(release)
	r.expectReply(77, 0)
	r.expectClosed()
	if mb.bytes(0, 3) != "abc" {
		t.Fatalf("write before DISC was lost")
	}
}

func TestBackendErrors(t *testing.T) {
	mb := newMemBackend(1 << 20)
	var writeErr atomic.Pointer[error]
	hb := &hookBackend{Backend: mb, onWrite: func(p []byte, off int64, fua bool) error {
		if e := writeErr.Load(); e != nil {
			return *e
		}
		return mb.WriteAt(p, off, fua)
	}, onFlush: func() error { panic("flush exploded") }}
	lookup, list := exports(map[string]Backend{"disk": hb, "other": mb})
	logger, logs := newTestLogger()
	addr := mustServe(t, &Server{Lookup: lookup, List: list, Logger: logger})
	c := mustDial(t, addr, "disk")

	for _, tc := range []struct {
		err  error
		want Errno
	}{
		{&os.PathError{Op: "write", Path: "x", Err: syscall.ENOSPC}, ENOSPC},
		{fmt.Errorf("log append: %w", syscall.EDQUOT), ENOSPC},
		{fmt.Errorf("wrapped: %w", EPERM), EPERM},
		{fmt.Errorf("sealed: %w", syscall.EROFS), EPERM},
		{errors.New("disk on fire"), EIO},
		{Errno(0), EIO},
	} {
		writeErr.Store(&tc.err)
		if err := c.WriteAt([]byte("x"), 0); !errors.Is(err, tc.want) {
			t.Errorf("backend error %v: client got %v, want %v", tc.err, err, tc.want)
		}
	}
	if !strings.Contains(logs.String(), "disk on fire") {
		t.Errorf("backend error not logged:\n%s", logs)
	}

	// A panicking backend costs its connection, not the server.
	other := mustDial(t, addr, "other")
	if err := c.Flush(); err == nil {
		t.Fatal("flush on panicking backend succeeded")
	}
	if err := c.ReadAt(make([]byte, 1), 0); err == nil {
		t.Fatal("connection survived a backend panic")
	}
	if err := other.WriteAt([]byte("y"), 0); err != nil {
		t.Fatalf("other connection broken by a backend panic: %v", err)
	}
	if !strings.Contains(logs.String(), "flush exploded") {
		t.Errorf("panic not logged:\n%s", logs)
	}
}

// TestMalformedInputIsolated checks that garbage on one connection closes
// that connection only, with a log line naming the reason and the peer.
func TestMalformedInputIsolated(t *testing.T) {
	fb, _ := mustFileBackend(t, 1<<20)
	lookup, list := exports(map[string]Backend{"disk": fb})
	logger, logs := newTestLogger()
	srv := &Server{Lookup: lookup, List: list, Logger: logger}

	// TCP, so that the peer has an address worth logging.
	l, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}()
	addr := l.Addr().String()

	good := mustDial(t, addr, "disk")
	if err := good.WriteAt([]byte("before"), 0); err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name, reason string
		send         func(r *rawConn)
	}{
		{"bad request magic", "bad request magic", func(r *rawConn) {
			r.goExport("disk")
			r.write(bytes.Repeat([]byte{0xee}, 64))
		}},
		{"oversize write", "payload limit", func(r *rawConn) {
			r.goExport("disk")
			r.sendReq(0, cmdWrite, 1, 0, MaxPayload+1, nil)
		}},
		{"truncated write", "truncated", func(r *rawConn) {
			r.goExport("disk")
			r.sendReq(0, cmdWrite, 1, 0, 4096, []byte("short"))
			r.c.(*net.TCPConn).CloseWrite()
		}},
		{"truncated header", "truncated", func(r *rawConn) {
			r.goExport("disk")
			r.write([]byte{0x25, 0x60, 0x95, 0x13, 0})
			r.c.(*net.TCPConn).CloseWrite()
		}},
		{"garbage handshake", "bad option magic", func(r *rawConn) {
			r.greet(flagCFixedNewstyle)
			r.write([]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, addr)
			local := r.c.LocalAddr().String()
			tc.send(r)
			r.expectClosed()
			if err := good.WriteAt([]byte(tc.name), 100); err != nil {
				t.Fatalf("other connection broken: %v", err)
			}
			got := make([]byte, 6)
			if err := good.ReadAt(got, 0); err != nil || string(got) != "before" {
				t.Fatalf("other connection read %q, %v", got, err)
			}
			deadline := time.Now().Add(5 * time.Second)
			for {
				var line string
				for _, l := range strings.Split(logs.String(), "\n") {
					if strings.Contains(l, "remote="+local) && strings.Contains(l, tc.reason) {
						line = l
					}
				}
				if line != "" {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("no log line with remote=%s and %q:\n%s", local, tc.reason, logs)
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
}

func TestHandshakeTimeout(t *testing.T) {
	logger, logs := newTestLogger()
	lookup, list := exports(map[string]Backend{"disk": newMemBackend(4096)})
	addr := mustServe(t, &Server{Lookup: lookup, List: list, Logger: logger, HandshakeTimeout: 100 * time.Millisecond})
	r := dialRaw(t, addr)
	r.read(18)
	start := time.Now()
	r.expectClosed()
	// Well before the default timeout (30 s), which must not be what closed
	// it; a loaded machine may take seconds for the 100 ms.
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("idle handshake closed after %v", d)
	}
	if !strings.Contains(logs.String(), "timeout") {
		t.Errorf("timeout not logged:\n%s", logs)
	}
}

func TestServeShutdown(t *testing.T) {
	base := runtime.NumGoroutine()
	mb := newMemBackend(1 << 20)
	entered := make(chan struct{})
	release := make(chan struct{})
	hb := &hookBackend{Backend: mb, onWrite: func(p []byte, off int64, fua bool) error {
		if off == 4096 {
			close(entered)
			<-release
		}
		return mb.WriteAt(p, off, fua)
	}}
	lookup, list := exports(map[string]Backend{"disk": hb})
	logger, _ := newTestLogger()
	srv := &Server{Lookup: lookup, List: list, Logger: logger}
	l, err := Listen("unix:" + socketPath(t))
	if err != nil {
		t.Fatal(err)
	}
	addr := "unix:" + l.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ctx, l) }()

	idle := mustDial(t, addr, "disk") // in transmission, idle
	stuck := dialRaw(t, addr)         // in the handshake
	stuck.read(18)
	busy := mustDial(t, addr, "disk")
	slow := make(chan error, 1)
	go func() { slow <- busy.WriteAt([]byte("slow"), 4096) }()
	<-entered

	cancel()
	time.Sleep(50 * time.Millisecond)
	select {
	case err := <-done:
		t.Fatalf("Serve returned with a request in flight: %v", err)
	default:
	}
	close(release)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after cancel")
	}
	if err := <-slow; err != nil {
		t.Fatalf("in-flight write failed during shutdown: %v", err)
	}
	if mb.bytes(4096, 4) != "slow" {
		t.Fatal("in-flight write lost")
	}
	stuck.expectClosed()
	if err := idle.ReadAt(make([]byte, 1), 0); err == nil {
		t.Fatal("connection still served after shutdown")
	}
	if _, err := Dial(context.Background(), addr, "disk"); err == nil {
		t.Fatal("Dial succeeded after shutdown")
	}
	idle.Close()
	busy.Close()
	stuck.c.Close()
	checkGoroutines(t, base)
}

func TestServeListenerClosed(t *testing.T) {
	base := runtime.NumGoroutine()
	lookup, list := exports(map[string]Backend{"disk": newMemBackend(4096)})
	logger, _ := newTestLogger()
	srv := &Server{Lookup: lookup, List: list, Logger: logger}
	l, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(context.Background(), l) }()
	c, err := Dial(context.Background(), l.Addr().String(), "disk")
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return after the listener closed")
	}
	if err := c.Flush(); err == nil {
		t.Fatal("connection outlived Serve")
	}
	c.Close()
	checkGoroutines(t, base)
}

func TestServeConnPipe(t *testing.T) {
	base := runtime.NumGoroutine()
	mb := newMemBackend(1 << 16)
	lookup, list := exports(map[string]Backend{"disk": mb})
	logger, _ := newTestLogger()
	srv := &Server{Lookup: lookup, List: list, Logger: logger}
	cs, ss := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(context.Background(), ss) }()
	c, err := NewClient(context.Background(), cs, "disk")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAtFUA([]byte("pipe"), 10); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("ServeConn after DISC: %v", err)
	}
	if mb.bytes(10, 4) != "pipe" {
		t.Fatal("write lost")
	}
	checkGoroutines(t, base)
}

func TestDialContext(t *testing.T) {
	// A server that never answers: Dial must give up when ctx does.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	silent := make(chan struct{})
	defer close(silent)
	go func() {
		c, err := l.Accept()
		if err == nil {
			defer c.Close()
			<-silent // until the test ends
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := Dial(ctx, l.Addr().String(), "disk"); err == nil {
		t.Fatal("Dial succeeded against a silent server")
	}
	// The server never answers: only ctx ends the Dial. (A loaded machine
	// may take seconds for the 100 ms; a Dial that ignored ctx never ends.)
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("Dial took %v to give up", d)
	}
}

func TestListen(t *testing.T) {
	dir := t.TempDir()
	if len(dir) > 90 {
		dir, _ = os.MkdirTemp("", "nbd")
		defer os.RemoveAll(dir)
	}
	sock := dir + "/a.sock"

	// A stale socket file (its listener gone without unlinking) is replaced.
	l1, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l1.(*net.UnixListener).SetUnlinkOnClose(false)
	l1.Close()
	if _, err := os.Stat(sock); err != nil {
		t.Fatalf("stale socket not left behind: %v", err)
	}
	l2, err := Listen("unix:" + sock)
	if err != nil {
		t.Fatalf("Listen over stale socket: %v", err)
	}
	// A live one is not.
	if _, err := Listen("unix:" + sock); err == nil {
		t.Fatal("Listen stole a live socket")
	}
	l2.Close()
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("socket file left after Close: %v", err)
	}

	// Nor is a regular file.
	file := dir + "/file"
	os.WriteFile(file, []byte("keep"), 0o600)
	if _, err := Listen("unix:" + file); err == nil {
		t.Fatal("Listen replaced a regular file")
	}
	if b, _ := os.ReadFile(file); string(b) != "keep" {
		t.Fatal("regular file damaged")
	}

	for _, bad := range []string{"unix:", "nonsense", "host:port:extra"} {
		if _, err := Listen(bad); err == nil {
			t.Errorf("Listen(%q) succeeded", bad)
		}
	}
	l3, err := Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if l3.Addr().Network() != "tcp" {
		t.Fatalf("network %s", l3.Addr().Network())
	}
	l3.Close()
}

func TestBufPool(t *testing.T) {
	for _, n := range []int{1, 4095, 4096, 4097, 1 << 20, MaxPayload - 1, MaxPayload} {
		p := getBuf(n)
		if len(*p) != n || cap(*p) < n || cap(*p)&(cap(*p)-1) != 0 {
			t.Fatalf("getBuf(%d): len %d cap %d", n, len(*p), cap(*p))
		}
		putBuf(p)
	}
	foreign := make([]byte, 5000)
	putBuf(&foreign) // ignored: not a pool size
	if p := getBuf(5000); cap(*p) != 8192 {
		t.Fatalf("pool handed out a foreign buffer of cap %d", cap(*p))
	}
}

// TestPayloadBudget: the payload bytes of the requests in flight on all
// connections together stay within MaxBytes; requests waiting for room go
// on as others complete (none is lost or refused); a request larger than
// the whole budget runs alone, a WRITE as a READ.
func TestPayloadBudget(t *testing.T) {
	const budget, piece = 64 << 10, 16 << 10
	mb := newMemBackend(1 << 20)
	var mu sync.Mutex
	var inBackend, peak int
	entered := make(chan struct{}, 64)
	gate, stop := make(chan struct{}), make(chan struct{})
	track := func(n int) func() {
		mu.Lock()
		inBackend += n
		peak = max(peak, inBackend)
		mu.Unlock()
		return func() { mu.Lock(); inBackend -= n; mu.Unlock() }
	}
	hb := &hookBackend{Backend: mb,
		onWrite: func(p []byte, off int64, fua bool) error {
			defer track(len(p))()
			entered <- struct{}{}
			select {
			case <-gate:
			case <-stop:
			}
			return mb.WriteAt(p, off, fua)
		},
		onRead: func(p []byte, off int64) error {
			defer track(len(p))()
			return mb.ReadAt(p, off)
		}}
	lookup, list := exports(map[string]Backend{"disk": hb})
	logger, _ := newTestLogger()
	addr := mustServe(t, &Server{Lookup: lookup, List: list, Logger: logger, MaxBytes: budget})
	conns := []*Client{mustDial(t, addr, "disk"), mustDial(t, addr, "disk")}
	t.Cleanup(func() { close(stop) }) // first: a failed test leaves no write waiting

	const writes = 12 // 192 KiB: three budgets' worth
	var wg sync.WaitGroup
	for i := range writes {
		wg.Go(func() {
			p := bytes.Repeat([]byte{byte(i + 1)}, piece)
			if err := conns[i%2].WriteAt(p, int64(i)*piece); err != nil {
				t.Error(err)
			}
		})
	}
	// The budget's worth enters the backend; then each one let through
	// makes room for one more, until all are done.
	for range budget / piece {
		<-entered
	}
	time.Sleep(50 * time.Millisecond) // give a broken budget the chance to show
	mu.Lock()
	now := inBackend
	mu.Unlock()
	if now != budget {
		t.Fatalf("%d payload bytes in the backend with every write waiting, want the budget's %d", now, budget)
	}
	go func() {
		for range writes {
			gate <- struct{}{}
		}
	}()
	for range writes - budget/piece {
		<-entered
	}
	wg.Wait()
	mu.Lock() // the replies' order is not one the race detector sees
	p := peak
	mu.Unlock()
	if p > budget {
		t.Fatalf("%d payload bytes in the backend at once, budget %d", p, budget)
	}
	for i := range writes {
		if got := mb.bytes(i*piece, 1); got != string([]byte{byte(i + 1)}) {
			t.Fatalf("write %d: byte %q", i, got)
		}
	}

	// Larger than the whole budget: runs once alone.
	big := bytes.Repeat([]byte{0xAB}, 2*budget)
	go func() { <-entered; gate <- struct{}{} }()
	if err := conns[0].WriteAt(big, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2*budget)
	if err := conns[1].ReadAt(got, 0); err != nil || !bytes.Equal(got, big) {
		t.Fatalf("read back the large write: %v", err)
	}
	mb.assertClean(t)
}

// gatedConn holds its first Write once armed until gate is closed.
type gatedConn struct {
	net.Conn
	armed atomic.Bool
	once  sync.Once
	gate  chan struct{}
}

func (g *gatedConn) Write(p []byte) (int, error) {
	if g.armed.Load() {
		g.once.Do(func() { <-g.gate })
	}
	return g.Conn.Write(p)
}

// TestRepliesBatched: the replies of requests that complete while a reply
// is being written go out together, in the writer's next write, not one
// write each. The first reply's write is held (the client not reading, as
// a busy guest's CPU) until every request has completed and queued its
// reply: then two writes send all eight, where one write per reply took
// eight. Every reply arrives, once, with its handle.
func TestRepliesBatched(t *testing.T) {
	const n = 8
	mb := newMemBackend(1 << 20)
	lookup, list := exports(map[string]Backend{"disk": mb})
	logger, _ := newTestLogger()
	srv := &Server{Lookup: lookup, List: list, Logger: logger}
	client, server := net.Pipe()
	g := &gatedConn{Conn: server, gate: make(chan struct{})}
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(context.Background(), g) }()
	client.SetDeadline(time.Now().Add(time.Minute))
	r := &rawConn{t: t, c: client, br: bufio.NewReader(client)}
	r.goExport("disk")
	g.armed.Store(true)
	for i := range n {
		r.sendReq(0, cmdWrite, uint64(100+i), uint64(i)*4096, 4096, bytes.Repeat([]byte{byte(i + 1)}, 4096))
	}
	for deadline := time.Now().Add(time.Minute); srv.queued.Load() < n; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d replies queued, want %d", srv.queued.Load(), n)
		}
	}
	close(g.gate)
	seen := map[uint64]bool{}
	for range n {
		errno, h := r.readReply()
		if errno != 0 || h < 100 || h >= 100+n || seen[h] {
			t.Fatalf("reply errno %d handle %d (seen %v)", errno, h, seen)
		}
		seen[h] = true
	}
	if b := srv.batches.Load(); b > 2 {
		t.Fatalf("%d replies sent in %d writes, want at most 2 (the held one, then the rest together)", n, b)
	}
	for i := range n {
		if got, want := mb.bytes(i*4096, 4096), string(bytes.Repeat([]byte{byte(i + 1)}, 4096)); got != want {
			t.Fatalf("block %d not written", i)
		}
	}
	client.Close()
	if err := <-done; err != nil {
		t.Fatalf("ServeConn: %v", err)
	}
}

// TestHandlersServeManyRequests: a connection's handler goroutines serve
// one request after another, at most MaxInFlight of them, instead of a new
// goroutine (a new stack, grown on every write) per request.
func TestHandlersServeManyRequests(t *testing.T) {
	const inFlight, rounds = 4, 50
	mb := newMemBackend(1 << 20)
	lookup, list := exports(map[string]Backend{"disk": mb})
	logger, _ := newTestLogger()
	srv := &Server{Lookup: lookup, List: list, Logger: logger, MaxInFlight: inFlight}
	client, server := net.Pipe()
	done := make(chan error, 1)
	go func() { done <- srv.ServeConn(context.Background(), server) }()
	client.SetDeadline(time.Now().Add(time.Minute))
	r := &rawConn{t: t, c: client, br: bufio.NewReader(client)}
	r.goExport("disk")
	for k := range rounds {
		for i := range inFlight {
			r.sendReq(0, cmdWrite, uint64(i), uint64(i)*4096, 4096, bytes.Repeat([]byte{byte(k)}, 4096))
		}
		for range inFlight {
			if errno, h := r.readReply(); errno != 0 || h >= inFlight {
				t.Fatalf("reply errno %d handle %d", errno, h)
			}
		}
	}
	if got, want := mb.bytes(0, 4096), string(bytes.Repeat([]byte{rounds - 1}, 4096)); got != want {
		t.Fatal("the last round's write is not on the disk")
	}
	if n := srv.handlers.Load(); n < 1 || n > inFlight {
		t.Fatalf("%d handlers started for %d requests, want 1 to %d", n, rounds*inFlight, inFlight)
	}
	client.Close()
	if err := <-done; err != nil {
		t.Fatalf("ServeConn: %v", err)
	}
}
