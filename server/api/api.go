// Package api is asr's control API in one place: the JSON bodies the
// server's REST API (/api/v1/...) takes and answers, the names of the
// states and kinds they carry, and [Client], the operator's side of it (the
// CLI and the benchmark driver use it). The web console shows the same
// types.
//
// It imports nothing of the server, the console or the agent: they import
// it. A state name that the replication layer already defines is an alias
// of it, so each name is defined once.
package api

import (
	"strconv"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
)

// Machine is a protected machine as the console shows it. It is also the JSON
// form of a machine in the server's API.
type Machine struct {
	ID           string    `json:"id"`
	Name         string    `json:"name"`
	Connected    bool      `json:"connected"`
	AgentVersion string    `json:"agent_version"`
	LastSeen     time.Time `json:"last_seen,omitzero"` // zero: never seen

	// State summarises the disks: StateResync if any disk needs a resync,
	// else StateInitial if any disk is still being copied, else
	// StateProtected; StateUnprotected for a machine whose protection
	// ended (whatever its disks were).
	State    string  `json:"state"`
	Progress float64 `json:"progress"`         // initial replication over all disks, by bytes, 0..1
	Reason   string  `json:"reason,omitempty"` // why a resync is needed

	RPO      time.Duration `json:"rpo_ns"` // current data-loss window; meaningful only if RPOKnown
	RPOKnown bool          `json:"rpo_known"`

	LastPoint     *Point `json:"last_point,omitempty"` // latest recovery point; nil if none
	PointCount    int    `json:"point_count"`
	BytesReceived int64  `json:"bytes_received"`
	CacheBytes    int64  `json:"cache_bytes"` // process-server backlog for this machine
	// ProcessServer names the process server serving the machine
	// (BuiltinProcessServer or a scale-out one's name).
	ProcessServer string `json:"process_server,omitempty"`
	Error         string `json:"error,omitempty"` // last error to show on the machine

	Policy string `json:"policy"`          // replication policy assigned
	Group  string `json:"group,omitempty"` // replication group ("" for none)

	// LastScrub is when the replica was last checked against its block
	// checksums (zero: never), ScrubResult what that found.
	LastScrub   time.Time `json:"last_scrub,omitzero"`
	ScrubResult string    `json:"scrub_result,omitempty"`
	ScrubDamage bool      `json:"scrub_damage,omitempty"` // the last scrub found damage

	// BIOSUUID is what the agent reports; VM the inventory's VM with that
	// UUID, or nil with LinkProblem saying why (LinkNoVM, LinkDuplicate,
	// ...; "" when no vCenter is registered).
	BIOSUUID    string  `json:"bios_uuid,omitempty"`
	VM          *VMLink `json:"vm,omitempty"`
	LinkProblem string  `json:"link_problem,omitempty"`

	// Unprotected: the machine's protection ended (asr unprotect) at
	// UnprotectedAt; its replica and recovery points are kept, its agent
	// is refused.
	Unprotected   bool      `json:"unprotected"`
	UnprotectedAt time.Time `json:"unprotected_at,omitzero"`

	// Direction is where the machine runs and which way its changes go
	// (failback): "" (protected as usual, from its original site),
	// failed-over (running from a committed or active failover),
	// reprotected (its changes go back to the original disks),
	// failing-back, failed-back (on premises again, forward protection
	// not resumed yet: asr reprotect).
	Direction string `json:"direction,omitempty"`
	// Reverse is the reverse direction of a reprotected machine (nil
	// unless its changes are being sent back to the original disks).
	Reverse *ReverseStatus `json:"reverse,omitempty"`
	// ReverseSource is the agent in the VM a committed failover to
	// vSphere made, when one connected (nil otherwise).
	ReverseSource *ReverseSource `json:"reverse_source,omitempty"`

	Disks []Disk `json:"disks"`
}

// ReverseStatus is how far a reprotected machine's original disks are
// behind the failed-over machine, against its failback policy.
type ReverseStatus struct {
	// RPO is the reverse RPO: the age of the oldest write to the
	// failed-over machine not yet acknowledged on the original disks (0:
	// none pending); an upper bound, late by at most the time to drain
	// what was pending a moment before. Meaningful only if RPOKnown (a
	// map saved by an older server holds blocks of unknown age until
	// drained).
	RPO       time.Duration `json:"rpo_ns"`
	RPOKnown  bool          `json:"rpo_known"`
	Threshold time.Duration `json:"threshold_ns"` // the failback policy's RPO threshold
	Policy    string        `json:"policy"`       // the failback policy
	Pending   int64         `json:"pending"`      // bytes written not yet on the original disks
	// FirstPassDone: what the failed-over machine wrote before reprotect
	// is on the original disks (the reverse RPO alert waits for it).
	FirstPassDone bool `json:"first_pass_done"`
	// ConsistentAt is the latest moment the original disks were known to
	// be a crash-consistent copy of the failed-over machine (nothing
	// pending on any disk); zero if none is known since the server
	// started. LastPoint is the newest reverse point recorded.
	ConsistentAt time.Time `json:"consistent_at,omitzero"`
	LastPoint    time.Time `json:"last_point,omitzero"`
}

// ReverseSource is the agent of a recovered VM: it runs the original
// machine's agent installation (same identity) and reports the
// recovered VM's BIOS UUID; the server takes it as the source of the
// reverse direction, never as the machine's own agent.
type ReverseSource struct {
	Kind      string    `json:"kind"` // "agent"
	VM        string    `json:"vm"`   // the recovered VM
	BIOSUUID  string    `json:"bios_uuid"`
	Connected bool      `json:"connected"`
	Since     time.Time `json:"since,omitzero"` // its connection's start
	Version   string    `json:"version,omitempty"`
	// Live: its writes go to the original disks as they happen (after
	// reprotect's compare); false: held (it spools), Held says why when
	// it is not just waiting for reprotect.
	Live bool   `json:"live"`
	Held string `json:"held,omitempty"`
	// Frozen: its last status says it refuses guest writes (frozen by
	// failback before the recovered VM's power-off).
	Frozen bool `json:"frozen,omitempty"`
	// Sent is the bytes written to the original disks from its log (kept
	// across server restarts in the failover's record); SpoolBytes what its last status says it holds
	// unacknowledged; OldestPending the time of the oldest of those.
	Sent int64 `json:"sent"`
	// Dropped is the bytes of its records not sent because they came
	// while its stream was held, before a compare began: that compare
	// read their blocks on the recovered disks (since the server
	// started).
	Dropped       int64     `json:"dropped,omitempty"`
	SpoolBytes    int64     `json:"spool_bytes"`
	OldestPending time.Time `json:"oldest_pending,omitzero"`
	LastError     string    `json:"last_error,omitempty"`
}

// ProcessServer is the process server's health as the console shows it
// (and the JSON of GET /api/v1/process-server).
type ProcessServer struct {
	BacklogBytes int64         `json:"backlog_bytes"`  // received, not yet applied to the target
	BacklogAge   time.Duration `json:"backlog_age_ns"` // age of the oldest data not yet applied
	UploadRate   float64       `json:"upload_rate"`    // bytes per second written to the target, last 10 s
	Uploaded     int64         `json:"uploaded"`       // bytes written to the target since the server started
	Compression  float64       `json:"compression"`    // uncompressed / compressed bytes received, as cached (0: none yet)
	CacheFree    float64       `json:"cache_free"`     // fraction of the cache disk free, 0..1
	CacheFreeB   uint64        `json:"cache_free_bytes"`
	CacheState   string        `json:"cache_state"` // ok, warning (under 30% free), critical (under 25%)
	CacheError   string        `json:"cache_error,omitempty"`
	CacheMaxB    int64         `json:"cache_max_bytes"` // past this the process server stops reading from agents (--cache-max)
	Target       string        `json:"target"`          // where replicated data lands, e.g. azure://acct/container

	RawBytes  int64 `json:"raw_bytes"`  // record bytes received since the server started
	WireBytes int64 `json:"wire_bytes"` // the same as they came over the wire (compressed)

	// The host's figures, as ASR's process-server health counts them: CPU
	// busy over the last 5 s (0..1; -1 not measured yet), memory in use
	// (0..1, of MemoryTotal bytes); HostError why they could not be read.
	CPU         float64 `json:"cpu"`
	Memory      float64 `json:"memory"`
	MemoryTotal uint64  `json:"memory_total_bytes"`
	HostError   string  `json:"host_error,omitempty"`

	// UploadETA is the estimated cache upload time: the backlog at the
	// current upload rate (0: no backlog; UploadStalled: a backlog and
	// nothing uploading).
	UploadETA time.Duration `json:"upload_eta_ns"`
}

// UploadStalled is a ProcessServer's UploadETA when its backlog is not
// being uploaded at all.
const UploadStalled = 1000 * time.Hour

// Cache states of a ProcessServer, as the process server names them.
const (
	CacheOK       = procserver.CacheOK
	CacheWarning  = procserver.CacheWarning
	CacheCritical = procserver.CacheCritical
	CacheUnknown  = procserver.CacheUnknown
)

// Disk capture modes (Disk.Mode), as the replication layer names them.
const (
	DiskModeNBD  = replication.DiskModeNBD
	DiskModeScan = replication.DiskModeScan
)

// Disk is one protected disk of a machine.
type Disk struct {
	Index    uint32  `json:"index"`
	Name     string  `json:"name"`
	Size     int64   `json:"size"` // bytes
	State    string  `json:"state"`
	Progress float64 `json:"progress"` // initial replication, 0..1
	Reason   string  `json:"reason,omitempty"`
	// Mode is how the agent captures the disk's changes: DiskModeNBD,
	// DiskModeScan, or "" if the agent has not said (older agents: NBD).
	Mode string `json:"mode,omitempty"`

	// Resync is the disk's pending, running or failed resync; nil if none.
	Resync *Resync `json:"resync,omitempty"`
}

// Resync is a disk's resync as the console shows it: why, when it starts,
// how far it is, and what went wrong last.
type Resync struct {
	State     string    `json:"state"` // ResyncScheduled, ResyncRunning or ResyncFailed
	Reason    string    `json:"reason"`
	Manual    bool      `json:"manual"`             // requested by an operator (ignores the resync window)
	Scheduled time.Time `json:"scheduled,omitzero"` // when a scheduled one starts
	Attempts  int       `json:"attempts"`           // failed attempts so far
	LastError string    `json:"last_error,omitempty"`
	Total     int64     `json:"total"`    // bytes to compare
	Compared  int64     `json:"compared"` // bytes compared so far
	Sent      int64     `json:"sent"`     // bytes of differing blocks sent
}

// States of a [Resync].
const (
	ResyncScheduled = replication.ResyncScheduled
	ResyncRunning   = replication.ResyncRunning
	ResyncFailed    = replication.ResyncFailed
)

// Point is a recovery point.
type Point struct {
	ID   string    `json:"id"`
	Time time.Time `json:"time"`
	Kind string    `json:"kind"` // PointCrash or PointApp
}

// Replication states of a machine or disk, as in [Machine.State].
const (
	StateInitial   = replication.StateInitial
	StateProtected = replication.StateProtected
	StateResync    = replication.StateResync
	// StateUnprotected is a machine whose protection ended, its replica
	// kept (a machine's state only, never a disk's).
	StateUnprotected = "unprotected"
	// StateDeleted answers an unprotect that deleted the replica too.
	StateDeleted = "deleted"
)

// Kinds of recovery point, as in [Point.Kind].
const (
	PointCrash        = replication.PointCrash        // crash-consistent
	PointApp          = replication.PointApp          // application-consistent
	PointInconsistent = replication.PointInconsistent // scan-mode disks outside a freeze
)

// PointJSON is a recovery point in API answers and `asr points --json`.
type PointJSON struct {
	ID   string `json:"id"`
	Time string `json:"time"` // RFC 3339, UTC
	Kind string `json:"kind"`
	// Cut is the replication group's cut the point is a member's part of
	// (replication.Point.Cut, in decimal; "": none).
	Cut string `json:"cut,omitempty"`
}

// PointOf is recovery point p as the API shows it.
func PointOf(p replication.Point) PointJSON {
	return PointJSON{ID: p.ID, Time: p.Time.UTC().Format(time.RFC3339Nano), Kind: p.Kind, Cut: cutString(p.Cut)}
}

// cutString is a cut id as the API shows it ("" for none).
func cutString(id uint64) string {
	if id == 0 {
		return ""
	}
	return strconv.FormatUint(id, 10)
}

// TagRequest is the body of POST /api/v1/machines/{m}/points.
type TagRequest struct {
	App     bool   `json:"app,omitempty"`
	Timeout string `json:"timeout,omitempty"` // Go duration, default 2m
	// NoWait returns 202 as soon as the request is handed to the agent.
	NoWait bool `json:"no_wait,omitempty"`
}

// Image stream headers and trailers: the size comes first, and since a
// damaged block may be met mid-stream (after the status line), the outcome
// comes last, in trailers the client must check.
const (
	HeaderImageSize    = "X-Asr-Size"    // bytes of the image
	HeaderImageChecked = "X-Asr-Checked" // "1": every block is checked against the point's checksums
	TrailerImageError  = "X-Asr-Error"   // set if the stream is incomplete, and why
	TrailerDamaged     = "X-Asr-Damaged" // with accept_damage: offsets of damaged blocks, comma-separated (at most MaxPSImageDamaged)
	// TrailerDamagedMore counts the damaged blocks streamed as they are
	// that TrailerDamaged does not list (past MaxPSImageDamaged).
	TrailerDamagedMore = "X-Asr-Damaged-More"
)

// ImageReadBuffer is the read buffer of the API client's connections. Go's
// client reads an answer's trailers within one read buffer (4 KiB by
// default), and a TrailerDamaged list of MaxPSImageDamaged offsets takes
// up to 10,000 x 20 bytes.
const ImageReadBuffer = 256 << 10

// TimePlanJSON is the answer of GET /api/v1/machines/{m}/timeplan?time=T:
// the point to start from and the kept segments to replay.
type TimePlanJSON struct {
	Time     string   `json:"time"`
	Base     string   `json:"base"` // point id
	Segments []string `json:"segments"`
}

// PolicyJSON is a policy in the API, with durations as Go duration strings
// ("15m", "24h", "0s").
type PolicyJSON struct {
	Name          string `json:"name"`
	RPOThreshold  string `json:"rpo_threshold"`
	Retention     string `json:"retention"`
	AppFrequency  string `json:"app_frequency"`
	CrashInterval string `json:"crash_interval"`
	PITWindow     string `json:"pit_window"`
	FailbackOf    string `json:"failback_of,omitempty"`
	// Notes, on a failback policy (read only), say which settings apply
	// to the reverse direction and why the others cannot (sentences
	// separated by "; ").
	Notes string `json:"notes,omitempty"`
}

// AssignRequest is the body of POST /api/v1/machines/{m}/policy.
type AssignRequest struct {
	Policy string `json:"policy"`
}

// AssignJSON answers POST /api/v1/machines/{m}/policy.
type AssignJSON struct {
	Machine string `json:"machine"`
	Policy  string `json:"policy"`
}

// ResyncWindowRequest is the body of PUT /api/v1/settings/resync-window:
// the vault's resync window, or with Policy that policy's.
type ResyncWindowRequest struct {
	Window string `json:"window"` // HH:MM-HH:MM (server local time) or always
	Policy string `json:"policy,omitempty"`
}

// ScrubRequest is the body (and the answer) of PUT /api/v1/settings/scrub.
type ScrubRequest struct {
	Every string `json:"every"` // a Go duration such as 168h, or off
}

// EventJSON is an event in the API.
type EventJSON struct {
	Time     string `json:"time"`
	Machine  string `json:"machine,omitempty"`
	Severity string `json:"severity"`
	Kind     string `json:"kind"`
	Message  string `json:"message"`
}

// GroupPointJSON is a group point in the API.
type GroupPointJSON struct {
	ID      string            `json:"id"`
	Time    string            `json:"time"`
	Kind    string            `json:"kind"`
	Members map[string]string `json:"members"` // machine name -> point id
	Cut     string            `json:"cut,omitempty"`
}

// GroupPointOf is group point gp as the API shows it, each member named
// by name(machine id).
func GroupPointOf(gp replication.GroupPoint, name func(id string) string) GroupPointJSON {
	out := GroupPointJSON{ID: gp.ID, Time: gp.Time.UTC().Format(time.RFC3339Nano), Kind: gp.Kind, Members: map[string]string{}, Cut: cutString(gp.Cut)}
	for id, pid := range gp.Members {
		out.Members[name(id)] = pid
	}
	return out
}

// GroupRequest is the body of POST /api/v1/machines/{m}/group.
type GroupRequest struct {
	Group string `json:"group"` // "" takes the machine out of its group
}

// UnprotectRequest is the body of POST /api/v1/machines/{m}/unprotect,
// which ends the machine's protection (disables its replication).
type UnprotectRequest struct {
	// DeleteReplica deletes the replica disks, the recovery points and
	// every record of the machine too (default: kept, for recovery).
	DeleteReplica bool `json:"delete_replica"`
}

// UnprotectJSON answers POST /api/v1/machines/{m}/unprotect.
type UnprotectJSON struct {
	Machine string `json:"machine"`
	State   string `json:"state"` // StateUnprotected (replica kept) or StateDeleted
}

// ResyncRequest is the body of POST /api/v1/machines/{m}/resync.
type ResyncRequest struct {
	Disk string `json:"disk,omitempty"` // "" : every disk
}

// ResyncJSON is a disk's resync in the API.
type ResyncJSON struct {
	Disk      string `json:"disk"`
	Reason    string `json:"reason"`
	State     string `json:"state"`
	Manual    bool   `json:"manual"`
	Scheduled string `json:"scheduled,omitempty"` // when it will start (RFC 3339)
	Attempts  int    `json:"attempts"`
	LastError string `json:"last_error,omitempty"`
	Total     int64  `json:"total"`
	Compared  int64  `json:"compared"`
	Sent      int64  `json:"sent"`
}

// VerifyRequest is the body of POST /api/v1/machines/{m}/verify.
type VerifyRequest struct {
	// Point checks a whole recovery point ("latest" or an id) through its
	// checksums, as a recovery would read it.
	Point string `json:"point,omitempty"`
	// NoSource skips the compare with the source (the scrub only).
	NoSource bool `json:"no_source,omitempty"`
}

// VerifyStatusJSON answers GET /api/v1/machines/{m}/verify: the last
// scrub and the verify (resync) jobs running.
type VerifyStatusJSON struct {
	Machine     string       `json:"machine"`
	LastScrub   string       `json:"last_scrub,omitempty"` // RFC 3339
	ScrubResult string       `json:"scrub_result,omitempty"`
	Jobs        []ResyncJSON `json:"jobs"`
}

// VerifyJSON is the answer: the scrub's (or the point check's) findings
// and the verify jobs started.
type VerifyJSON struct {
	Machine string                  `json:"machine"`
	Scrub   *procserver.ScrubReport `json:"scrub,omitempty"`
	Point   []procserver.PointScrub `json:"point,omitempty"`
	Jobs    []ResyncJSON            `json:"jobs,omitempty"`
	Summary string                  `json:"summary"`
	Damaged bool                    `json:"damaged"`
}
