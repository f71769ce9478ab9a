package drill

import (
	"context"
	"errors"
	"io"
	"regexp"
	"strings"
	"testing"
	"time"
)

func TestOptionsValidation(t *testing.T) {
	sock := "/run/asr/nbd.sock"
	re := regexp.MustCompile("login:")
	for _, tc := range []struct {
		name string
		o    Options
		bad  string // substring of the error; "" for valid
	}{
		{"valid console", Options{Disks: []Disk{{Socket: sock}}, BootCheck: re}, ""},
		{"valid port", Options{Disks: []Disk{{Socket: sock}}, TCPPort: 22}, ""},
		{"no disks", Options{BootCheck: re}, "no disks"},
		{"relative socket", Options{Disks: []Disk{{Socket: "nbd.sock"}}, BootCheck: re}, "not an absolute path"},
		{"no check", Options{Disks: []Disk{{Socket: sock}}}, "neither"},
		{"bad port", Options{Disks: []Disk{{Socket: sock}}, TCPPort: 70000}, "TCP port"},
		{"negative memory", Options{Disks: []Disk{{Socket: sock}}, TCPPort: 22, MemoryMiB: -1}, "negative"},
		{"bad accel", Options{Disks: []Disk{{Socket: sock}}, TCPPort: 22, Accel: "hvf"}, "accel"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, err := tc.o.withDefaults()
			if tc.bad == "" {
				if err != nil {
					t.Fatal(err)
				}
				if o.CPUs != DefaultCPUs || o.MemoryMiB != DefaultMemoryMiB || o.Timeout != DefaultTimeout || o.QEMU != DefaultQEMU {
					t.Errorf("defaults not applied: %+v", o)
				}
				if o.Disks[0].Name != "disk0" {
					t.Errorf("disk name %q", o.Disks[0].Name)
				}
				return
			}
			if !errors.Is(err, ErrInvalidOptions) || !strings.Contains(err.Error(), tc.bad) {
				t.Fatalf("err %v, want ErrInvalidOptions with %q", err, tc.bad)
			}
			if _, err := Boot(context.Background(), tc.o); !errors.Is(err, ErrInvalidOptions) {
				t.Errorf("Boot: %v", err)
			}
		})
	}
}

func TestConsoleScan(t *testing.T) {
	for _, tc := range []struct {
		name   string
		chunks []string
		check  string
		match  bool
	}{
		{"whole line", []string{"booting\r\n", "ASR-DRILL-BOOTED vm1\r\n"}, `^ASR-DRILL-BOOTED vm1$`, true},
		{"split across reads", []string{"ASR-DRI", "LL-BOO", "TED\n"}, `^ASR-DRILL-BOOTED$`, true},
		{"prompt without newline", []string{"Debian 12\n\nvm1 login: "}, `login: $`, true},
		{"no match", []string{"Kernel panic - not syncing\n"}, `login:`, false},
		{"anchors are per line", []string{"a\nb\n"}, `^a\nb$`, false},
		{"control characters dropped", []string{"\x1b[0mready\x07\n"}, `^\[0mready$`, true},
		{"long line is split", []string{strings.Repeat("x", maxLine+10) + "TAIL\n"}, `^x{10}TAIL$`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := newConsole(regexp.MustCompile(tc.check), 5)
			var log strings.Builder
			matches := 0
			c.scan(&chunkReader{chunks: append([]string(nil), tc.chunks...)}, &log, func() { matches++ })
			if got := matches == 1; got != tc.match || matches > 1 {
				t.Errorf("matches %d, want match %v", matches, tc.match)
			}
			if log.String() != strings.Join(tc.chunks, "") {
				t.Errorf("log %q", log.String())
			}
		})
	}
}

func TestConsoleTail(t *testing.T) {
	c := newConsole(nil, 3)
	c.feed([]byte("1\n2\n3\n4\r\n5"))
	if got, want := c.tail(), "3\n4\n5"; got != want {
		t.Errorf("tail %q, want %q", got, want)
	}
	c.feed([]byte("\n6\n"))
	if got, want := c.tail(), "4\n5\n6"; got != want {
		t.Errorf("tail %q, want %q", got, want)
	}
}

func TestFailReason(t *testing.T) {
	c := &conditions{bootCheck: regexp.MustCompile("login:"), tcpPort: 22}
	c.tcpAt = time.Now()
	r := failReason("timed out after 1m0s", c, "line1\nline2", "")
	for _, want := range []string{"timed out after 1m0s", `console never matched "login:"`, "last console lines:\nline1\nline2"} {
		if !strings.Contains(r, want) {
			t.Errorf("reason %q lacks %q", r, want)
		}
	}
	if strings.Contains(r, "port 22") {
		t.Errorf("reason names a met condition: %q", r)
	}
	r = failReason("qemu exited (exit status 1)", &conditions{tcpPort: 22}, "", "could not open disk\n")
	for _, want := range []string{"guest TCP port 22 never answered", "qemu: could not open disk", "no console output"} {
		if !strings.Contains(r, want) {
			t.Errorf("reason %q lacks %q", r, want)
		}
	}
}

func TestUsernetState(t *testing.T) {
	const out = "Hub -1 (n0):\r\n" +
		"  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n" +
		"  TCP[SYN_SYNC]       19       127.0.0.1 40080       10.0.2.15    80     0     0\r\n" +
		"  TCP[ESTABLISHED]   18       127.0.0.1 40080       10.0.2.15    80     0     0\r\n" +
		"  TCP[HOST_FORWARD]   9       127.0.0.1 40080       10.0.2.15    22     0     0\r\n" +
		"  UDP[236 sec]        12       10.0.2.15 68       10.0.2.2    67     0     0\r\n"
	for _, tc := range []struct {
		dst   int
		state string
		found bool
	}{{80, "ESTABLISHED", true}, {22, "", false}, {443, "", false}} {
		st, found := usernetState(out, 40080, tc.dst)
		if st != tc.state || found != tc.found {
			t.Errorf("port %d: %q %v, want %q %v", tc.dst, st, found, tc.state, tc.found)
		}
	}
	if st, found := usernetState("  TCP[SYN_SENT]  20  127.0.0.1 40080  10.0.2.15  80  0  0\n", 40080, 80); st != "SYN_SENT" || !found {
		t.Errorf("%q %v", st, found)
	}
}

func TestQEMUArgs(t *testing.T) {
	o, err := Options{
		Disks:   []Disk{{Socket: "/run/a,b:c.sock", Export: "vm1/disk0"}, {Socket: "/run/d.sock"}},
		TCPPort: 3389, CPUs: 2, MemoryMiB: 2048,
	}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	args, err := qemuArgs(o, AccelTCG, "/tmp/q.sock")
	if err != nil {
		t.Fatal(err)
	}
	joined := strings.Join(args, " ")
	for _, want := range []string{
		"-accel tcg", "-smp 2", "-m 2048", "-serial stdio", "-nodefaults",
		`"path":"/run/a,b:c.sock"`, `"export":"vm1/disk0"`, `"cache":{"direct":true}`,
		"virtio-blk-pci,drive=disk0,bootindex=0", "virtio-blk-pci,drive=disk1,bootindex=1",
		"user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:40080-:3389",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("args lack %q:\n%s", want, joined)
		}
	}
	if strings.Contains(joined, "-cpu host") {
		t.Errorf("-cpu host under TCG")
	}
}

// chunkReader returns its chunks one Read at a time, then io.EOF.
type chunkReader struct{ chunks []string }

func (r *chunkReader) Read(p []byte) (int, error) {
	if len(r.chunks) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.chunks[0])
	r.chunks[0] = r.chunks[0][n:]
	if r.chunks[0] == "" {
		r.chunks = r.chunks[1:]
	}
	return n, nil
}

// FuzzConsoleFeed feeds arbitrary guest output (untrusted bytes): the
// scanner must not panic, must keep at most its line limit, and must
// report a match at most once.
func FuzzConsoleFeed(f *testing.F) {
	f.Add([]byte("login: \r\nASR-DRILL-BOOTED\n"), 3)
	f.Add([]byte(strings.Repeat("y", 9000)), 1)
	f.Fuzz(func(t *testing.T, b []byte, split int) {
		c := newConsole(regexp.MustCompile(`BOOTED|login:`), 4)
		if split <= 0 || split > len(b) {
			split = len(b)
		}
		matches := 0
		for len(b) > 0 {
			n := min(split, len(b))
			if c.feed(b[:n]) {
				matches++
			}
			b = b[n:]
		}
		if matches > 1 {
			t.Fatalf("%d matches", matches)
		}
		if len(c.lines) > 4 || len(c.partial) > maxLine {
			t.Fatalf("%d lines kept, partial %d bytes", len(c.lines), len(c.partial))
		}
		_ = c.tail()
	})
}
