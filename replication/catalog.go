package replication

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The catalog is the target's own record of what it holds: machines, their
// disks, and recovery points. It lives on the target beside the data so a new
// asr on a fresh machine, given the storage and the vault passphrase, can list
// points and recover after the on-premises site is lost.
//
// Keys:
//
//	vault                              the vault descriptor (VaultInfo)
//	machines/<id>/machine              MachineCatalog
//	machines/<id>/points/<%016x seq>   Point (one object per point)
//	machines/<id>/disks/<index>        replica disk (Target.OpenDisk)

// Disk states in the catalog (and in the server's database).
const (
	StateInitial   = "initial"
	StateProtected = "protected"
	StateResync    = "resync"
)

// OverflowReason is the reason of the resync an agent's spool overflow
// starts (the start record it logs as its spool fills). The agent ends it
// itself, resending the blocks it marked meanwhile, so the server
// schedules no checksum resync for it: one started in the resync window
// hashed the whole disk on the guest while the agent was still resending.
// An agent that stops in the middle marks its disks for a full resync at
// its next start, with another reason, which is scheduled.
const OverflowReason = "spool overflow: the agent tracks changed blocks until it catches up"

// States of a disk's resync as the server schedules it (its database, the
// API and the console).
const (
	ResyncScheduled = "scheduled"
	ResyncRunning   = "running"
	ResyncFailed    = "failed"
)

// MachineCatalog is the catalog entry of one machine.
type MachineCatalog struct {
	ID         string        `json:"id"`
	Name       string        `json:"name"`
	Disks      []CatalogDisk `json:"disks"`
	AppliedSeq uint64        `json:"applied_seq"` // every record up to here is on the replica disks
	Updated    time.Time     `json:"updated"`
	// LogID names the agent log the machine's sequence numbers belong to
	// ("": none known yet, as in a vault from before log ids; the next
	// agent's log id is adopted).
	LogID string `json:"log_id,omitempty"`
	// LogStart is the first sequence number of the current log when it
	// replaced an earlier one (0: the machine's first log), LogReason why.
	// Every record of the old log (all before LogStart) was applied first;
	// then the disks were marked: the complete ones (or being resynced)
	// for a whole-disk resync, the others to copy again.
	LogStart  uint64 `json:"log_start,omitempty"`
	LogReason string `json:"log_reason,omitempty"`
	// LogEnded, when set, says why the machine's log ended (it was
	// re-registered): the next agent's log is a new one whatever its id.
	LogEnded string `json:"log_ended,omitempty"`
}

// CatalogDisk is a replica disk in the catalog.
type CatalogDisk struct {
	Index  uint32 `json:"index"`
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	State  string `json:"state"`
	Cursor int64  `json:"cursor"` // initial replication: source bytes applied
	Reason string `json:"reason,omitempty"`
	// Ranges limits a needed resync to these byte ranges (empty: the
	// whole disk).
	Ranges []Range `json:"ranges,omitempty"`
	// LastResync is the id of the last resync completed, and what it
	// compared and sent.
	LastResync         uint64 `json:"last_resync,omitempty"`
	LastResyncCompared int64  `json:"last_resync_compared,omitempty"`
	LastResyncSent     int64  `json:"last_resync_sent,omitempty"`
	// Sums is set once the disk has block checksums on the target
	// (SumKey); a disk replicated before they existed gets them, built
	// from the replica, when its applier next opens.
	Sums bool `json:"sums,omitempty"`
}

// Range is a byte range of a disk.
type Range struct {
	Off int64 `json:"off"`
	Len int64 `json:"len"`
}

// Disk returns the catalog disk with the given index.
func (m *MachineCatalog) Disk(index uint32) (*CatalogDisk, bool) {
	for i := range m.Disks {
		if m.Disks[i].Index == index {
			return &m.Disks[i], true
		}
	}
	return nil, false
}

// Protected reports whether every disk has completed initial replication and
// none needs a resync: only then can a recovery point be made.
func (m *MachineCatalog) Protected() bool {
	if len(m.Disks) == 0 {
		return false
	}
	for _, d := range m.Disks {
		if d.State != StateProtected {
			return false
		}
	}
	return true
}

var diskNameRE = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$`)

// ValidDiskName reports whether a disk name is acceptable: it becomes a file
// name (NAME.img) when the disk is recovered.
func ValidDiskName(name string) bool { return diskNameRE.MatchString(name) }

var machineNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidMachineName reports whether a machine name is acceptable: 1 to 64
// letters, digits, '.', '_' and '-', starting with a letter or digit. The
// name becomes a directory name at recovery, a URL path segment and a
// command-line argument, and is printed raw by `asr status`: no separators,
// quotes, spaces or control characters, and no leading '-' (read as a flag)
// or '.' ("..", hidden files). This is stricter than ValidDiskName only in
// the first character, and is the rule agents have always applied, so every
// name registered by an agent stays valid.
func ValidMachineName(name string) bool { return machineNameRE.MatchString(name) }

// MachineNameRule says what ValidMachineName accepts, for error messages.
const MachineNameRule = "1 to 64 letters, digits, '.', '_' and '-', starting with a letter or digit"

// Point kinds.
const (
	PointCrash = "crash"
	PointApp   = "app"
	// PointInconsistent is a point of a machine with scan-mode disks taken
	// outside a freeze: each disk is as its last scan found it.
	PointInconsistent = "inconsistent"
)

// Point is a recovery point: a consistent cut across all disks of a machine,
// after record Seq. Each disk has a snapshot named SnapshotName(Seq).
type Point struct {
	ID    string    `json:"id"`
	Seq   uint64    `json:"seq"`
	Time  time.Time `json:"time"`
	Kind  string    `json:"kind"`
	Disks []uint32  `json:"disks"`
	// Sizes are the disks' sizes at the point (a disk may grow later).
	Sizes map[uint32]int64 `json:"sizes,omitempty"`
	// Sums is set when every disk's block checksums were snapshotted with
	// it (sums.go): recovery checks what it reads. Points made before asr
	// kept checksums have none and are recovered unchecked.
	Sums bool `json:"sums,omitempty"`
	// Cut is the id of the replication group's cut this point is a
	// member's part of (its tag record has FlagCut), the same on every
	// member's point and on the group point; 0: none. A cut that failed
	// after some members tagged leaves points with a Cut no group point
	// names: only a group point says its members form a consistent cut.
	Cut uint64 `json:"cut,omitempty"`
}

// PointID is the identifier operators use for the point after record seq.
func PointID(seq uint64) string { return strconv.FormatUint(seq, 10) }

// SnapshotName is the replica-disk snapshot name of the point after seq;
// fixed-width hex, so names sort in point order.
func SnapshotName(seq uint64) string { return fmt.Sprintf("%016x", seq) }

// VaultInfo describes the vault a target belongs to.
type VaultInfo struct {
	ID      string    `json:"id"`
	Created time.Time `json:"created"`
	// Verifier proves knowledge of the vault passphrase without storing it.
	Salt     []byte `json:"salt"`
	Verifier []byte `json:"verifier"`
	// WrappedKey is the data key every other object is sealed with
	// (seal.go), wrapped by a key derived from the passphrase.
	WrappedKey []byte `json:"wrapped_key,omitempty"`
	// Encrypting is set while a vault made before encryption existed has
	// its objects sealed (OpenVault converts it).
	Encrypting bool `json:"encrypting,omitempty"`
	// MAC authenticates the descriptor (every field above) under a key
	// derived from the passphrase: the descriptor is the one plain object,
	// and nobody without the passphrase may change what it says.
	MAC []byte `json:"mac,omitempty"`
}

// ObjectCodec turns a catalog object stored at key into the bytes stored on
// the target and back. The plain codec only frames and checksums; the
// sealed codec (seal.go) encrypts too.
type ObjectCodec interface {
	Seal(key, kind string, plain []byte) ([]byte, error)
	Open(key, kind string, stored []byte) ([]byte, error)
}

// PlainCodec stores objects as: magic "ASROBJ", version u16, kind length u16,
// kind, payload, CRC-32C of all before it.
type PlainCodec struct{}

var objMagic = [6]byte{'A', 'S', 'R', 'O', 'B', 'J'}

const objVersion = 1

// Seal frames plain.
func (PlainCodec) Seal(_, kind string, plain []byte) ([]byte, error) {
	b := make([]byte, 0, 10+len(kind)+len(plain)+4)
	b = append(b, objMagic[:]...)
	b = binary.LittleEndian.AppendUint16(b, objVersion)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(kind)))
	b = append(b, kind...)
	b = append(b, plain...)
	return binary.LittleEndian.AppendUint32(b, Checksum(b)), nil
}

// Open checks and unframes stored bytes.
func (PlainCodec) Open(_, kind string, b []byte) ([]byte, error) {
	if len(b) < 14 || [6]byte(b[:6]) != objMagic {
		return nil, fmt.Errorf("%s object: bad magic: %w", kind, ErrCorrupt)
	}
	body, sum := b[:len(b)-4], binary.LittleEndian.Uint32(b[len(b)-4:])
	if Checksum(body) != sum {
		return nil, fmt.Errorf("%s object: checksum mismatch: %w", kind, ErrCorrupt)
	}
	if v := binary.LittleEndian.Uint16(b[6:]); v != objVersion {
		return nil, fmt.Errorf("%s object: version %d not supported: %w", kind, v, ErrCorrupt)
	}
	kl := int(binary.LittleEndian.Uint16(b[8:]))
	if 10+kl > len(body) || string(body[10:10+kl]) != kind {
		return nil, fmt.Errorf("%s object: holds another kind of object: %w", kind, ErrCorrupt)
	}
	return body[10+kl:], nil
}

// Catalog reads and writes catalog objects on a target. The server's
// catalog seals them (OpenVault); the vault descriptor is always plain.
type Catalog struct {
	T     Target
	Codec ObjectCodec
}

// vaultKey is the key of the vault descriptor.
const vaultKey = "vault"

func machineKey(id string) string { return "machines/" + id + "/machine" }

// MachineOfKey returns the machine a target key belongs to: every key under
// machines/<id>/ (its catalog entry, points, kept segments, replica and
// checksum disks), which only the holder of the machine's lease writes
// (MachineLeaser). ok is false for the others (the vault descriptor,
// group points).
func MachineOfKey(key string) (id string, ok bool) {
	rest, ok := strings.CutPrefix(key, "machines/")
	if !ok {
		return "", false
	}
	id, _, ok = strings.Cut(rest, "/")
	if !ok || !ValidKeyElem(id) {
		return "", false
	}
	return id, true
}

// pointKey names a point's catalog object. The key itself carries the
// sequence number, time and kind, so listing the points needs no reads.
func pointKey(id string, p Point) string {
	return fmt.Sprintf("machines/%s/points/%016x.%016x.%s", id, p.Seq, p.Time.UnixNano(), p.Kind)
}

// parsePointKey is the inverse of pointKey for the last path element.
func parsePointKey(name string) (Point, bool) {
	var seq, ns uint64
	parts := strings.SplitN(name, ".", 3)
	if len(parts) != 3 || len(parts[0]) != 16 || len(parts[1]) != 16 {
		return Point{}, false
	}
	if _, err := fmt.Sscanf(parts[0]+" "+parts[1], "%x %x", &seq, &ns); err != nil {
		return Point{}, false
	}
	if parts[2] != PointCrash && parts[2] != PointApp && parts[2] != PointInconsistent {
		return Point{}, false
	}
	return Point{ID: PointID(seq), Seq: seq, Time: time.Unix(0, int64(ns)).UTC(), Kind: parts[2]}, true
}

// DiskKey is the target key of a machine's replica disk.
func DiskKey(machineID string, index uint32) string {
	return "machines/" + machineID + "/disks/" + strconv.FormatUint(uint64(index), 10)
}

func (c *Catalog) put(ctx context.Context, key, kind string, v any) error {
	p, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return c.putRaw(ctx, key, kind, p)
}

func (c *Catalog) codec(key string) ObjectCodec {
	if c.Codec == nil || key == vaultKey {
		return PlainCodec{}
	}
	return c.Codec
}

func (c *Catalog) putRaw(ctx context.Context, key, kind string, p []byte) error {
	b, err := c.codec(key).Seal(key, kind, p)
	if err != nil {
		return err
	}
	return c.T.PutObject(ctx, key, b)
}

func (c *Catalog) getRaw(ctx context.Context, key, kind string) ([]byte, error) {
	b, err := c.T.GetObject(ctx, key)
	if err != nil {
		return nil, err
	}
	p, err := c.codec(key).Open(key, kind, b)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", key, err)
	}
	return p, nil
}

func (c *Catalog) get(ctx context.Context, key, kind string, v any) error {
	p, err := c.getRaw(ctx, key, kind)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(p, v); err != nil {
		return fmt.Errorf("%s: %v: %w", key, err, ErrCorrupt)
	}
	return nil
}

// Vault reads the vault descriptor.
func (c *Catalog) Vault(ctx context.Context) (VaultInfo, error) {
	var v VaultInfo
	return v, c.get(ctx, vaultKey, "vault", &v)
}

// PutVault writes the vault descriptor.
func (c *Catalog) PutVault(ctx context.Context, v VaultInfo) error {
	return c.put(ctx, vaultKey, "vault", v)
}

// Machine reads a machine's entry.
func (c *Catalog) Machine(ctx context.Context, id string) (MachineCatalog, error) {
	var m MachineCatalog
	return m, c.get(ctx, machineKey(id), "machine", &m)
}

// PutMachine writes a machine's entry.
func (c *Catalog) PutMachine(ctx context.Context, m *MachineCatalog) error {
	m.Updated = time.Now().UTC()
	return c.put(ctx, machineKey(m.ID), "machine", m)
}

// Machines lists every machine in the catalog, by name.
func (c *Catalog) Machines(ctx context.Context) ([]MachineCatalog, error) {
	objs, err := c.T.ListObjects(ctx, "machines/")
	if err != nil {
		return nil, err
	}
	var ms []MachineCatalog
	for _, o := range objs {
		rest := strings.TrimPrefix(o.Key, "machines/")
		id, name, ok := strings.Cut(rest, "/")
		if !ok || name != "machine" {
			continue
		}
		m, err := c.Machine(ctx, id)
		if err != nil {
			return nil, err
		}
		ms = append(ms, m)
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].Name < ms[j].Name })
	return ms, nil
}

// FindMachine finds a machine by name or id.
func (c *Catalog) FindMachine(ctx context.Context, nameOrID string) (MachineCatalog, error) {
	ms, err := c.Machines(ctx)
	if err != nil {
		return MachineCatalog{}, err
	}
	for _, m := range ms {
		if m.Name == nameOrID || m.ID == nameOrID {
			return m, nil
		}
	}
	return MachineCatalog{}, fmt.Errorf("machine %q: %w", nameOrID, ErrNotFound)
}

// PutPoint records a point.
func (c *Catalog) PutPoint(ctx context.Context, machineID string, p Point) error {
	return c.put(ctx, pointKey(machineID, p), "point", p)
}

// DeletePoint removes a point's catalog entry (its snapshots separately).
func (c *Catalog) DeletePoint(ctx context.Context, machineID string, p Point) error {
	return c.T.DeleteObject(ctx, pointKey(machineID, p))
}

// Points lists a machine's recovery points, oldest first, from the object
// listing alone (Disks is not filled in; FindPoint reads the whole entry).
func (c *Catalog) Points(ctx context.Context, machineID string) ([]Point, error) {
	prefix := "machines/" + machineID + "/points/"
	objs, err := c.T.ListObjects(ctx, prefix)
	if err != nil {
		return nil, err
	}
	ps := make([]Point, 0, len(objs))
	for _, o := range objs {
		p, ok := parsePointKey(strings.TrimPrefix(o.Key, prefix))
		if !ok {
			return nil, fmt.Errorf("catalog object %s: not a point: %w", o.Key, ErrCorrupt)
		}
		ps = append(ps, p)
	}
	sort.Slice(ps, func(i, j int) bool { return ps[i].Seq < ps[j].Seq })
	return ps, nil
}

// ErrNoPoint is returned when a requested recovery point does not exist.
var ErrNoPoint = errors.New("no such recovery point")

// FindPoint resolves "latest" or a point id among a machine's points.
func (c *Catalog) FindPoint(ctx context.Context, machineID, id string) (Point, error) {
	ps, err := c.Points(ctx, machineID)
	if err != nil {
		return Point{}, err
	}
	if len(ps) == 0 {
		return Point{}, fmt.Errorf("machine %s has no recovery points yet: %w", machineID, ErrNoPoint)
	}
	found := -1
	if id == "latest" || id == "" {
		found = len(ps) - 1
	}
	for i, p := range ps {
		if p.ID == id {
			found = i
		}
	}
	if found < 0 {
		return Point{}, fmt.Errorf("point %q of machine %s: %w", id, machineID, ErrNoPoint)
	}
	var p Point
	if err := c.get(ctx, pointKey(machineID, ps[found]), "point", &p); err != nil {
		return Point{}, err
	}
	return p, nil
}

// SegmentInfo describes a segment kept on the target for any-point-in-time
// recovery: its sequence range and the time of its last record, all in the
// object's key so listing needs no reads.
type SegmentInfo struct {
	First, Last uint64
	LastTime    time.Time
	Key         string
}

func segmentKey(machineID string, si SegmentInfo) string {
	return fmt.Sprintf("machines/%s/segments/%016x-%016x.%016x.seg", machineID, si.First, si.Last, si.LastTime.UnixNano())
}

// PutSegment keeps a sealed segment on the target.
func (c *Catalog) PutSegment(ctx context.Context, machineID string, si SegmentInfo, data []byte) error {
	return c.putRaw(ctx, segmentKey(machineID, si), "segment", data)
}

// Segments lists a machine's kept segments in sequence order.
func (c *Catalog) Segments(ctx context.Context, machineID string) ([]SegmentInfo, error) {
	prefix := "machines/" + machineID + "/segments/"
	objs, err := c.T.ListObjects(ctx, prefix)
	if err != nil {
		return nil, err
	}
	out := make([]SegmentInfo, 0, len(objs))
	for _, o := range objs {
		var si SegmentInfo
		var ns uint64
		name := strings.TrimPrefix(o.Key, prefix)
		if _, err := fmt.Sscanf(name, "%016x-%016x.%016x.seg", &si.First, &si.Last, &ns); err != nil || si.Last < si.First {
			return nil, fmt.Errorf("catalog object %s: not a segment: %w", o.Key, ErrCorrupt)
		}
		si.LastTime, si.Key = time.Unix(0, int64(ns)).UTC(), o.Key
		out = append(out, si)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].First < out[j].First })
	return out, nil
}

// Segment reads a kept segment.
func (c *Catalog) Segment(ctx context.Context, si SegmentInfo) ([]byte, error) {
	return c.getRaw(ctx, si.Key, "segment")
}

// DeleteSegment removes a kept segment.
func (c *Catalog) DeleteSegment(ctx context.Context, si SegmentInfo) error {
	return c.T.DeleteObject(ctx, si.Key)
}

// GroupPoint is a recovery point of a replication group: one point per
// member machine, all from the same cut.
type GroupPoint struct {
	ID      string            `json:"id"`
	Time    time.Time         `json:"time"`
	Kind    string            `json:"kind"`    // app only if every member's point is
	Members map[string]string `json:"members"` // machine id -> point id
	// Cut is the cut's id, the Cut of every member's point (0 in group
	// points made before points recorded it).
	Cut uint64 `json:"cut,omitempty"`
}

var groupNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// ValidGroupName reports whether a replication group name is acceptable.
func ValidGroupName(name string) bool { return groupNameRE.MatchString(name) }

// PutGroupPoint records a group point.
func (c *Catalog) PutGroupPoint(ctx context.Context, group string, gp GroupPoint) error {
	n, err := strconv.ParseUint(gp.ID, 10, 64)
	if err != nil {
		return fmt.Errorf("group point id %q: %w", gp.ID, err)
	}
	return c.put(ctx, fmt.Sprintf("groups/%s/points/%020d", group, n), "grouppoint", gp)
}

// GroupPoints lists a group's points, oldest first.
func (c *Catalog) GroupPoints(ctx context.Context, group string) ([]GroupPoint, error) {
	objs, err := c.T.ListObjects(ctx, "groups/"+group+"/points/")
	if err != nil {
		return nil, err
	}
	out := make([]GroupPoint, 0, len(objs))
	for _, o := range objs {
		var gp GroupPoint
		if err := c.get(ctx, o.Key, "grouppoint", &gp); err != nil {
			return nil, err
		}
		out = append(out, gp)
	}
	return out, nil
}

// FindGroupPoint resolves "latest" or an id among a group's points.
func (c *Catalog) FindGroupPoint(ctx context.Context, group, id string) (GroupPoint, error) {
	gps, err := c.GroupPoints(ctx, group)
	if err != nil {
		return GroupPoint{}, err
	}
	if len(gps) == 0 {
		return GroupPoint{}, fmt.Errorf("group %s has no recovery points: %w", group, ErrNoPoint)
	}
	if id == "" || id == "latest" {
		return gps[len(gps)-1], nil
	}
	for _, gp := range gps {
		if gp.ID == id {
			return gp, nil
		}
	}
	return GroupPoint{}, fmt.Errorf("point %q of group %s: %w", id, group, ErrNoPoint)
}

// DeleteMachine deletes everything of a machine on the target: its replica
// and sum disks with their snapshots (its recovery points' data), its kept
// segments and points, its membership of group points (a group point left
// without members goes), and last its catalog entry. The entry goes last
// because it names the disks: a deletion cut short (a crash, a disk still
// open for a recovery: ErrDiskOpen) is finished by running it again. A
// machine without an entry has nothing left but objects under its prefix,
// which are deleted. The machine's disks must not be open (its applier
// closed).
func (c *Catalog) DeleteMachine(ctx context.Context, id string) error {
	m, err := c.Machine(ctx, id)
	if err != nil && !errors.Is(err, ErrNotFound) {
		return fmt.Errorf("read the catalog of machine %s: %w", id, err)
	}
	for _, d := range m.Disks {
		if err := c.T.DeleteDisk(ctx, DiskKey(id, d.Index)); err != nil {
			return fmt.Errorf("delete the replica of disk %s: %w", d.Name, err)
		}
		if err := c.T.DeleteDisk(ctx, SumKey(id, d.Index)); err != nil {
			return fmt.Errorf("delete the checksums of disk %s: %w", d.Name, err)
		}
	}
	if err := c.dropGroupMember(ctx, id); err != nil {
		return err
	}
	objs, err := c.T.ListObjects(ctx, "machines/"+id+"/")
	if err != nil {
		return err
	}
	for _, o := range objs {
		if o.Key == machineKey(id) {
			continue
		}
		if err := c.T.DeleteObject(ctx, o.Key); err != nil {
			return fmt.Errorf("delete %s: %w", o.Key, err)
		}
	}
	if err := c.T.DeleteObject(ctx, machineKey(id)); err != nil {
		return err
	}
	if l, ok := c.T.(MachineLeaser); ok {
		// Last: nothing opens a deleted machine again.
		return l.DropMachineLease(ctx, id)
	}
	return nil
}

// dropGroupMember takes machine id out of every group point that names it.
func (c *Catalog) dropGroupMember(ctx context.Context, id string) error {
	objs, err := c.T.ListObjects(ctx, "groups/")
	if err != nil {
		return err
	}
	for _, o := range objs {
		if !strings.Contains(o.Key, "/points/") {
			continue
		}
		var gp GroupPoint
		if err := c.get(ctx, o.Key, "grouppoint", &gp); err != nil {
			return err
		}
		if _, ok := gp.Members[id]; !ok {
			continue
		}
		delete(gp.Members, id)
		if len(gp.Members) == 0 {
			err = c.T.DeleteObject(ctx, o.Key)
		} else {
			err = c.put(ctx, o.Key, "grouppoint", gp)
		}
		if err != nil {
			return fmt.Errorf("take machine %s out of group point %s: %w", id, o.Key, err)
		}
	}
	return nil
}
