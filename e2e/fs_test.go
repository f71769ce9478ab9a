//go:build e2e

package e2e

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestE2EExt4AppConsistent: an ext4 file system built with mkfs.ext4,
// changed with debugfs and copied into a protected disk with nbdcopy
// (through the splitter); the images recovered from application-consistent
// points pass e2fsck -fn and hold exactly the files written before each
// point. The agent also freezes a real mounted file system (FIFREEZE) for
// each point and leaves it thawed.
func TestE2EExt4AppConsistent(t *testing.T) {
	t.Parallel()
	for _, tool := range []string{"mkfs.ext4", "debugfs", "e2fsck"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is required for this test but is not installed (apt-get install e2fsprogs)", tool)
		}
	}
	c := newCluster(t)
	// A mounted file system for the freeze (a loop mount needs root).
	frz := filepath.Join(c.dir, "frz.img")
	mnt := filepath.Join(c.dir, "mnt")
	os.MkdirAll(mnt, 0o755)
	mustRun(t, "truncate", "-s", "16M", frz)
	mustRun(t, "mkfs.ext4", "-q", frz)
	if out, err := exec.Command("mount", "-o", "loop", frz, mnt).CombinedOutput(); err != nil {
		t.Fatalf("loop-mount a file system to freeze (needs root and loop devices): %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", mnt).Run() })

	const size = 64 << 20
	disk := filepath.Join(c.dir, "d.img")
	mustRun(t, "truncate", "-s", "64M", disk)
	marks := filepath.Join(c.dir, "hooks.log")
	hook := filepath.Join(c.dir, "hook.sh")
	os.WriteFile(hook, []byte("#!/bin/sh\necho $1 >> "+marks+"\n"), 0o755)
	a := c.startAgent("vm1", []string{"--freeze", mnt, "--pre-freeze", hook, "--post-thaw", hook}, "d="+disk)
	c.waitState("vm1", "protected", time.Minute)

	// Version 1 of the file system, built locally and copied in.
	fs := filepath.Join(c.dir, "fs.img")
	mustRun(t, "truncate", "-s", "64M", fs)
	mustRun(t, "mkfs.ext4", "-q", "-F", fs)
	one := filepath.Join(c.dir, "one.txt")
	os.WriteFile(one, bytes.Repeat([]byte("first file before point one\n"), 1000), 0o644)
	debugfsW(t, fs, "mkdir /data", "write "+one+" /data/one.txt")
	nbdPeerRun(t, "nbdcopy", fs, a.uri("d"))
	p1 := c.appTag(t)

	// Version 2: another file, the first one removed.
	two := filepath.Join(c.dir, "two.txt")
	os.WriteFile(two, bytes.Repeat([]byte("second file after point one\n"), 3000), 0o644)
	debugfsW(t, fs, "write "+two+" /data/two.txt", "rm /data/one.txt")
	nbdPeerRun(t, "nbdcopy", fs, a.uri("d"))
	p2 := c.appTag(t)

	for _, tc := range []struct {
		point, want, gone string
	}{{p1, one, "/data/two.txt"}, {p2, two, "/data/one.txt"}} {
		out := filepath.Join(c.dir, "rec-"+tc.point)
		c.mustCLI("recover", "--machine", "vm1", "--point", tc.point, "--out", out)
		img := filepath.Join(out, "d.img")
		if fsck, err := exec.Command("e2fsck", "-fn", img).CombinedOutput(); err != nil {
			t.Fatalf("e2fsck -fn of point %s: %v\n%s", tc.point, err, fsck)
		}
		got, err := exec.Command("debugfs", "-R", "cat /data/"+filepath.Base(tc.want), img).Output()
		wantData, _ := os.ReadFile(tc.want)
		if err != nil || !bytes.Equal(got, wantData) {
			t.Fatalf("point %s: /data/%s is not the file written before it (%v)", tc.point, filepath.Base(tc.want), err)
		}
		if ls, _ := exec.Command("debugfs", "-R", "ls -l /data", img).Output(); strings.Contains(string(ls), filepath.Base(tc.gone)) {
			t.Fatalf("point %s holds %s, written after it or removed before it:\n%s", tc.point, tc.gone, ls)
		}
	}
	// The frozen file system was thawed each time, and the hooks ran.
	if err := os.WriteFile(filepath.Join(mnt, "after"), []byte("writable"), 0o644); err != nil {
		t.Fatalf("the frozen file system is not writable after the points: %v", err)
	}
	if b, _ := os.ReadFile(marks); string(b) != "freeze\nthaw\nfreeze\nthaw\n" {
		t.Fatalf("freeze hooks ran as %q", b)
	}
}

// appTag takes an application-consistent point and checks its kind.
func (c *cluster) appTag(t *testing.T) string {
	t.Helper()
	out := c.mustCLI("tag", "--machine", "vm1", "--wait", "--app", "--timeout", tagTimeout)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	id := lines[len(lines)-1]
	var points []struct{ ID, Kind string }
	json.Unmarshal([]byte(c.mustCLI("points", "--machine", "vm1", "--json")), &points)
	for _, p := range points {
		if p.ID == id && p.Kind != "app" {
			t.Fatalf("point %s has kind %s, want app", id, p.Kind)
		}
	}
	return id
}

// debugfsW runs debugfs commands, one at a time, on an image, read-write.
func debugfsW(t *testing.T, img string, cmds ...string) {
	t.Helper()
	for _, cmd := range cmds {
		out, err := exec.Command("debugfs", "-w", "-R", cmd, img).CombinedOutput()
		if err != nil || strings.Contains(string(out), "debugfs: ") && strings.Contains(strings.ToLower(string(out)), "error") {
			t.Fatalf("debugfs -w -R %q: %v\n%s", cmd, err, out)
		}
	}
}

func mustRun(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}
