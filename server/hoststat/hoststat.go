// Package hoststat measures the machine the process server runs on: CPU
// use over the last sampling interval and memory in use, as ASR's process
// server health counts them (CPU and memory above 80 % warn, above 95 %
// are critical). It reads Linux's /proc; elsewhere Sample returns an error
// and the figures stay unknown.
package hoststat

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Figures are the host's last measured use.
type Figures struct {
	// CPU is the fraction of all CPUs busy over the last interval, 0..1
	// (-1: not measured yet: a first sample has no interval).
	CPU float64
	// Memory is the fraction of memory in use, 0..1: 1 - MemAvailable /
	// MemTotal, as free(1) counts "available".
	Memory      float64
	MemoryTotal uint64 // bytes
	At          time.Time
	Err         error // why the last sample failed, nil if it did not
}

// Sampler turns successive readings of /proc/stat into a CPU fraction.
// Its zero value is not usable: make one with New.
type Sampler struct {
	root string // "/proc", or a test's directory

	mu        sync.Mutex
	busy, all uint64 // the previous /proc/stat reading
	have      bool
	last      Figures
}

// New returns a Sampler of this machine's /proc.
func New() *Sampler { return NewAt("/proc") }

// NewAt returns a Sampler reading stat and meminfo files under root.
func NewAt(root string) *Sampler { return &Sampler{root: root, last: Figures{CPU: -1}} }

// Sample reads the host's figures now. CPU covers the time since the
// previous Sample (-1 on the first).
func (s *Sampler) Sample(now time.Time) (Figures, error) {
	busy, all, err := readStat(s.root + "/stat")
	if err == nil {
		var mem, total uint64
		mem, total, err = readMeminfo(s.root + "/meminfo")
		s.mu.Lock()
		defer s.mu.Unlock()
		if err == nil {
			f := Figures{CPU: -1, MemoryTotal: total, At: now}
			if total > 0 {
				f.Memory = float64(total-min(mem, total)) / float64(total)
			}
			if s.have && all > s.all && busy >= s.busy {
				f.CPU = min(1, float64(busy-s.busy)/float64(all-s.all))
			} else if s.have {
				f.CPU = s.last.CPU
			}
			s.busy, s.all, s.have = busy, all, true
			s.last = f
			return f, nil
		}
	} else {
		s.mu.Lock()
		defer s.mu.Unlock()
	}
	s.last.Err = err
	return s.last, err
}

// Last returns the last figures measured (CPU -1 before two samples).
func (s *Sampler) Last() Figures {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.last
}

// readStat returns the busy and total jiffies of the "cpu" line: busy is
// everything but idle and iowait.
func readStat(path string) (busy, all uint64, err error) {
	b, err := readSmall(path)
	if err != nil {
		return 0, 0, err
	}
	line, _, _ := bytes.Cut(b, []byte("\n"))
	f := strings.Fields(string(line))
	if len(f) < 5 || f[0] != "cpu" {
		return 0, 0, fmt.Errorf("%s: no cpu line", path)
	}
	// user nice system idle iowait irq softirq steal (guest, guest_nice are
	// inside user and nice already).
	for i, v := range f[1:min(len(f), 9)] {
		n, err := strconv.ParseUint(v, 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("%s: %v", path, err)
		}
		all += n
		if i != 3 && i != 4 {
			busy += n
		}
	}
	return busy, all, nil
}

// readMeminfo returns MemAvailable and MemTotal in bytes.
func readMeminfo(path string) (avail, total uint64, err error) {
	b, err := readSmall(path)
	if err != nil {
		return 0, 0, err
	}
	var haveA, haveT bool
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok || (k != "MemTotal" && k != "MemAvailable") {
			continue
		}
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil || n > 1<<50 {
			return 0, 0, fmt.Errorf("%s: bad %s", path, k)
		}
		if k == "MemTotal" {
			total, haveT = n*1024, true
		} else {
			avail, haveA = n*1024, true
		}
	}
	if !haveA || !haveT {
		return 0, 0, fmt.Errorf("%s: no MemTotal or MemAvailable", path)
	}
	return avail, total, nil
}

// maxProcFile bounds what readSmall reads of a /proc file.
const maxProcFile = 1 << 20

// readSmall reads a /proc file of at most maxProcFile bytes. The buffer
// grows with what the file holds (/proc/meminfo and /proc/stat are a few
// KiB): a sample runs with every heartbeat, and a 1 MiB buffer each time
// was 256 fresh pages to fault in and zero for a 2 KiB file.
func readSmall(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxProcFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxProcFile {
		return nil, fmt.Errorf("%s: larger than %d bytes", path, maxProcFile)
	}
	return b, nil
}
