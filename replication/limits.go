package replication

import "fmt"

// Limits a receiver enforces on control messages (docs/PROTOCOL.md, Limits).
// A JSON payload is at most MaxFramePayload bytes, so decoding one costs
// memory in proportion to the bytes received; these limits bound what the
// receiver then does with the counts and values inside (a hash index per
// disk, a resync over each range, a row per event). Each is the most a peer
// of this version sends, with room; raising one is a protocol change.
const (
	// MaxDisks bounds the disks of a machine (Hello, Status): VMware gives
	// a VM at most 60 virtual disks.
	MaxDisks = 64
	// MaxDiskSize bounds a disk's size: VMware's largest virtual disk is
	// 62 TB.
	MaxDiskSize = 64 << 40
	// MaxDivergedRanges bounds the ranges a disk reports diverged in Hello
	// (an agent with more reports their hull) and the ranges of a ResyncJob,
	// which come from them.
	MaxDivergedRanges = 1024
	// MaxHashBatch bounds the chunks of one resync batch: the offsets of a
	// Hashes frame and the chunks of the Want that answers it.
	MaxHashBatch = 64
	// MaxStatusEvents bounds the events one Status carries (the agent
	// queues at most this many between reports).
	MaxStatusEvents = 100
)

// validationError is a control message that decoded but breaks a limit or
// a rule of the protocol: a protocol error, so the connection is closed and
// nothing the message said is used.
func validationError(what, format string, args ...any) error {
	return &ProtocolError{what + ": " + fmt.Sprintf(format, args...)}
}

// Validate checks a Hello against the protocol's limits: at most MaxDisks
// disks with valid, distinct names and distinct indexes, sizes up to
// MaxDiskSize, diverged ranges within them, and a well-formed BIOS UUID.
func (h *Hello) Validate() error {
	if len(h.Disks) > MaxDisks {
		return validationError("hello", "%d disks, at most %d", len(h.Disks), MaxDisks)
	}
	names := make(map[string]bool, len(h.Disks))
	indexes := make(map[uint32]bool, len(h.Disks))
	for i := range h.Disks {
		d := &h.Disks[i]
		if err := d.Validate(); err != nil {
			return err
		}
		if names[d.Name] {
			return validationError("hello", "disk name %q given twice", d.Name)
		}
		if indexes[d.Index] {
			return validationError("hello", "disk index %d given twice", d.Index)
		}
		names[d.Name], indexes[d.Index] = true, true
	}
	if h.BIOSUUID != "" {
		if _, err := ParseBIOSUUID(h.BIOSUUID); err != nil {
			return validationError("hello", "%v", err)
		}
	}
	return nil
}

// Validate checks one disk of a Hello.
func (d *DiskInfo) Validate() error {
	if !ValidDiskName(d.Name) {
		return validationError("hello", "disk name %q: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'", d.Name)
	}
	if d.Size < 0 || d.Size > MaxDiskSize {
		return validationError("hello", "disk %s: size %d is not between 0 and %d (larger than asr supports: VMware's largest virtual disk is 62 TB)", d.Name, d.Size, int64(MaxDiskSize))
	}
	if d.Mode != "" && d.Mode != DiskModeNBD && d.Mode != DiskModeScan {
		return validationError("hello", "disk %s: mode %q, want %s or %s", d.Name, d.Mode, DiskModeNBD, DiskModeScan)
	}
	if len(d.DivergedRanges) > MaxDivergedRanges {
		return validationError("hello", "disk %s: %d diverged ranges, at most %d", d.Name, len(d.DivergedRanges), MaxDivergedRanges)
	}
	for _, r := range d.DivergedRanges {
		if err := r.validate(); err != nil {
			return validationError("hello", "disk %s: diverged range %v", d.Name, err)
		}
	}
	return nil
}

// validate checks a byte range of a disk: not empty, inside MaxDiskSize.
func (r Range) validate() error {
	if r.Off < 0 || r.Len <= 0 || r.Off > MaxDiskSize || r.Len > MaxDiskSize-r.Off {
		return fmt.Errorf("%d+%d is not a range of at most %d bytes", r.Off, r.Len, int64(MaxDiskSize))
	}
	return nil
}

// Validate checks a Welcome: the count of its codecs, and its policy, if any.
func (w *Welcome) Validate() error {
	if len(w.Codecs) > maxCodecs {
		return validationError("welcome", "%d codecs, over the %d limit", len(w.Codecs), maxCodecs)
	}
	if w.Policy != nil {
		return w.Policy.Validate()
	}
	return nil
}

// maxCodecs bounds Welcome.Codecs.
const maxCodecs = 16

// Validate checks a point schedule: no negative interval, a valid group name.
func (p *AgentPolicy) Validate() error {
	if p.CrashInterval < 0 || p.AppFrequency < 0 {
		return validationError("policy", "negative interval (crash %d, app %d)", p.CrashInterval, p.AppFrequency)
	}
	if p.Group != "" && !ValidGroupName(p.Group) {
		return validationError("policy", "group name %q is not valid", p.Group)
	}
	return nil
}

// Validate checks a Status: at most MaxDisks disks and MaxStatusEvents events.
func (s *Status) Validate() error {
	if len(s.Disks) > MaxDisks {
		return validationError("status", "%d disks, at most %d", len(s.Disks), MaxDisks)
	}
	if len(s.Events) > MaxStatusEvents {
		return validationError("status", "%d events, at most %d", len(s.Events), MaxStatusEvents)
	}
	if s.Failover != "" && !ValidFreezeID(s.Failover) {
		return validationError("status", "failover id %q is not valid", s.Failover)
	}
	return nil
}

// ValidFreezeID reports whether id may name a planned failover (Freeze.ID):
// the rule of machine names (MachineNameRule), as it ends up in file names
// and logs.
func ValidFreezeID(id string) bool { return ValidMachineName(id) }

// Validate checks a Freeze: its ID follows ValidFreezeID.
func (f *Freeze) Validate() error {
	if !ValidFreezeID(f.ID) {
		return validationError("freeze", "id %q: want %s", f.ID, MachineNameRule)
	}
	return nil
}

// Validate checks a ResyncJob: at most MaxDivergedRanges ranges, each
// inside MaxDiskSize.
func (j *ResyncJob) Validate() error {
	if len(j.Ranges) > MaxDivergedRanges {
		return validationError("resync", "job %d: %d ranges, at most %d", j.ID, len(j.Ranges), MaxDivergedRanges)
	}
	for _, r := range j.Ranges {
		if err := r.validate(); err != nil {
			return validationError("resync", "job %d: range %v", j.ID, err)
		}
	}
	return nil
}

// validChunkOff reports whether off can start a resync chunk.
func validChunkOff(off int64) bool {
	return off >= 0 && off < MaxDiskSize && off%HashChunk == 0
}

// Validate checks a Hashes batch: at most MaxHashBatch chunk offsets, each
// chunk-aligned and inside MaxDiskSize, in increasing order, with one
// 16-byte hash each.
func (h *Hashes) Validate() error {
	if len(h.Offs) > MaxHashBatch {
		return validationError("hashes", "batch %d: %d chunks, at most %d", h.Batch, len(h.Offs), MaxHashBatch)
	}
	if len(h.Hashes) != 16*len(h.Offs) {
		return validationError("hashes", "batch %d: %d bytes of hashes for %d chunks", h.Batch, len(h.Hashes), len(h.Offs))
	}
	for i, off := range h.Offs {
		if !validChunkOff(off) || (i > 0 && off <= h.Offs[i-1]) {
			return validationError("hashes", "batch %d: chunk offset %d is not an increasing multiple of %d below %d", h.Batch, off, HashChunk, int64(MaxDiskSize))
		}
	}
	return nil
}

// Validate checks a Want: at most MaxHashBatch chunks, each chunk-aligned
// with one 16-byte hash per block of the chunk (at most HashFanout).
func (w *Want) Validate() error {
	if len(w.Chunks) > MaxHashBatch {
		return validationError("want", "batch %d: %d chunks, at most %d", w.Batch, len(w.Chunks), MaxHashBatch)
	}
	for _, c := range w.Chunks {
		if !validChunkOff(c.Off) {
			return validationError("want", "batch %d: chunk offset %d is not a multiple of %d below %d", w.Batch, c.Off, HashChunk, int64(MaxDiskSize))
		}
		if n := len(c.Leaves); n == 0 || n%16 != 0 || n > 16*HashFanout {
			return validationError("want", "batch %d: chunk %d has %d bytes of block hashes, want 16 per block, at most %d blocks", w.Batch, c.Off, n, HashFanout)
		}
	}
	return nil
}
