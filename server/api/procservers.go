package api

import (
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
)

// ProcessServerHeartbeat is the body of POST
// /api/v1/process-servers/heartbeat: a scale-out process server's health
// and figures, sent every few seconds over mutual TLS (its client
// certificate names it).
type ProcessServerHeartbeat struct {
	Name    string        `json:"name"`
	VaultID string        `json:"vault_id"` // the vault its target holds: must be the configuration server's
	Figures ProcessServer `json:"figures"`
	// Machines are the ids of the machines it has open (and so holds the
	// lease of), at most MaxPSMachines.
	Machines []string `json:"machines"`
	// Reports are what it reports of the machines it has open (at most
	// MaxPSReportMachines; the others in later heartbeats). News are
	// numbered: ReportSeq counts, from 1, the news-carrying heartbeats of
	// this run of the process server (Run, a random id made at its
	// start). Heartbeats are sent again with the same news and number
	// until one is answered, and the configuration server takes a
	// number's news once.
	Reports   []PSMachineReport `json:"reports,omitempty"`
	Run       string            `json:"run,omitempty"`
	ReportSeq uint64            `json:"report_seq,omitempty"`
	// Results are the outcomes of the commands it finished (at most
	// MaxPSCommands).
	Results []PSCommandResult `json:"results,omitempty"`
}

// MaxPSMachines bounds the machines a heartbeat or its reply names (ASR
// sizes a process server at about 200 machines).
const MaxPSMachines = 10000

// ProcessServerHeartbeatReply answers a heartbeat.
type ProcessServerHeartbeatReply struct {
	// Every is how often the configuration server wants heartbeats.
	Every time.Duration `json:"every_ns"`
	// Assigned are the machines it serves: it accepts their agents (with
	// the certificate serial of their latest registration) and hands over
	// any other machine it has open (procserver.Release).
	Assigned []PSAssignment `json:"assigned"`
	// Commands are the commands it is to run (PSCommand), at most
	// MaxPSCommands; each is named again until its result comes.
	Commands []PSCommand `json:"commands,omitempty"`
}

// PSAssignment is a machine a scale-out process server serves.
type PSAssignment struct {
	MachineID  string `json:"machine_id"`
	Name       string `json:"name"`
	CertSerial string `json:"cert_serial"`
	// Policy is the point schedule its agent is sent (at connection,
	// and again when it changes).
	Policy *replication.AgentPolicy `json:"policy,omitempty"`
}

// SwitchRequest is the body of POST /api/v1/machines/{m}/process-server.
type SwitchRequest struct {
	To string `json:"to"` // a scale-out process server's name, BuiltinProcessServer or AutoProcessServer
}

// Process server states in a ProcessServerInfo.
const (
	PSHealthy     = "healthy"      // a heartbeat within the lost interval
	PSNoHeartbeat = "no-heartbeat" // none for the lost interval (or none since this server started)
)

// BuiltinProcessServer names the configuration server's own process
// server in lists; no scale-out process server may take the name.
const BuiltinProcessServer = "builtin"

// AutoProcessServer, as a switch's destination, picks the healthy process
// server with the least churn (upload rate), the built-in one included; no
// process server may take the name either.
const AutoProcessServer = "auto"

// ProcessServerInfo is one process server in GET /api/v1/process-servers.
type ProcessServerInfo struct {
	Name       string    `json:"name"`
	Builtin    bool      `json:"builtin,omitempty"`
	DataAddr   string    `json:"data_addr"`
	Registered time.Time `json:"registered,omitzero"`
	// LastHeartbeat is the last heartbeat since this configuration server
	// started (zero: none yet); State is PSHealthy or PSNoHeartbeat.
	LastHeartbeat time.Time     `json:"last_heartbeat,omitzero"`
	State         string        `json:"state"`
	Figures       ProcessServer `json:"figures"`
	// Machines is how many machines are assigned to it (the built-in
	// one: how many it has open).
	Machines int `json:"machines"`
}

// NewProcessServer makes a process server's figures from its own
// (procserver.Figures) and its host's (CPU and memory 0..1, CPU -1 not
// measured yet; hostErr why they could not be read): the same for the
// built-in process server and a scale-out one's heartbeat.
func NewProcessServer(f procserver.Figures, cpu, memory float64, memTotal uint64, hostErr error, target string) ProcessServer {
	ps := ProcessServer{BacklogBytes: f.BacklogBytes, BacklogAge: f.BacklogAge, UploadRate: f.UploadRate, Uploaded: f.Uploaded,
		Compression: f.Compression, CacheFree: f.CacheFree, CacheFreeB: f.CacheFreeB, CacheState: f.CacheState,
		CacheError: f.CacheError, CacheMaxB: f.CacheMaxBytes, Target: target,
		CPU: cpu, Memory: memory, MemoryTotal: memTotal, RawBytes: f.RawBytes, WireBytes: f.WireBytes}
	if hostErr != nil {
		ps.HostError = hostErr.Error()
	}
	ps.UploadETA = UploadETA(f.BacklogBytes, f.UploadRate)
	return ps
}

// UploadETA is ASR's "estimated cache upload time": the backlog over the
// upload rate. With a backlog and nothing uploading it is unbounded
// (UploadStalled).
func UploadETA(backlog int64, rate float64) time.Duration {
	switch {
	case backlog <= 0:
		return 0
	case rate < 1:
		return UploadStalled
	}
	eta := float64(backlog) / rate * float64(time.Second)
	if eta >= float64(UploadStalled) {
		return UploadStalled
	}
	return time.Duration(eta)
}

// SwitchAllResult answers POST /api/v1/process-servers/{name}/switch: the
// machines moved.
type SwitchAllResult struct {
	Moved []string `json:"moved"`
}

// SwitchResult answers POST /api/v1/machines/{m}/process-server: the
// process server the machine is on now.
type SwitchResult struct {
	ProcessServer string `json:"process_server"`
}

// Bounds of what one heartbeat carries about the machines a scale-out
// process server has open (PSMachineReport) and of the commands a reply
// carries: a process server with more sends the rest in later heartbeats.
const (
	MaxPSReportMachines = 256  // machine reports per heartbeat
	MaxPSReportPoints   = 64   // new recovery points per machine per heartbeat
	MaxPSReportEvents   = 64   // events (agent events, damage, quarantines) per machine per heartbeat
	MaxPSDamageBlocks   = 1024 // blocks named by one damage report
	MaxPSCommands       = 256  // commands per reply, results per heartbeat
	// MaxPSHeartbeatBytes bounds a heartbeat's body; a process server
	// keeps the news of one heartbeat within MaxPSNewsBytes (one
	// machine's news at least), which leaves room for the figures of
	// MaxPSReportMachines machines and the ids of MaxPSMachines.
	MaxPSHeartbeatBytes = 8 << 20
	MaxPSNewsBytes      = 4 << 20
)

// PSMachineReport is what a scale-out process server reports of one
// machine it has open, for the configuration server's vault database and
// views: the figures its built-in process server would give
// (procserver.MachineStats) and, in News, what happened since the last
// report the configuration server acknowledged.
type PSMachineReport struct {
	MachineID string `json:"machine_id"`
	Connected bool   `json:"connected"`
	// Status is the agent's last status (without its events, which are
	// in News), StatusAge how long ago the process server received it
	// (its own clock: the configuration server subtracts it from the
	// heartbeat's arrival); nil: no status since it opened the machine.
	Status       *replication.Status `json:"status,omitempty"`
	StatusAge    time.Duration       `json:"status_age_ns,omitempty"`
	DurableSeq   uint64              `json:"durable_seq"`
	AppliedSeq   uint64              `json:"applied_seq"`
	CacheBytes   int64               `json:"cache_bytes"`
	Segments     int                 `json:"segments"`
	ApplyError   string              `json:"apply_error,omitempty"`
	BacklogBytes int64               `json:"backlog_bytes"`
	BacklogAge   time.Duration       `json:"backlog_age_ns,omitempty"` // how old the oldest backlog byte is
	AppliedBytes int64               `json:"applied_bytes"`
	News         *PSNews             `json:"news,omitempty"`
}

// PSNews is what the process server's callbacks (procserver.Config: OnState,
// OnPoint, OnBytes, OnStatus, OnConnect, OnRefused, OnDamage, OnQuarantine)
// reported of one machine since the last acknowledged report; the
// configuration server hands each to its own callback of the same name.
type PSNews struct {
	State   *replication.MachineCatalog `json:"state,omitempty"` // the newest catalog view
	Points  []replication.Point         `json:"points,omitempty"`
	Bytes   int64                       `json:"bytes,omitempty"` // payload bytes received
	Events  []replication.AgentEvent    `json:"events,omitempty"`
	Resyncs []replication.ResyncStatus  `json:"resyncs,omitempty"` // each disk's latest progress
	// Connect is the Hello of the agent's latest connection (its version,
	// BIOS UUID and disks' modes), Refused why an agent was turned away.
	Connect    *replication.Hello  `json:"connect,omitempty"`
	Refused    string              `json:"refused,omitempty"`
	Damage     []procserver.Damage `json:"damage,omitempty"`
	Quarantine []PSQuarantine      `json:"quarantine,omitempty"`
	// Reconcile says points were dropped while the configuration server
	// could not be reached: it rereads the machine's points from the
	// catalog.
	Reconcile bool `json:"reconcile,omitempty"`
}

// PSQuarantine is a cached segment that failed verification (OnQuarantine).
type PSQuarantine struct {
	Path   string `json:"path"`
	Reason string `json:"reason"`
}

// PSCommand is something the configuration server asks a scale-out
// process server to do for a machine it serves, carried in heartbeat
// replies until the process server reports its result (PSCommandResult):
// the process server runs each id once.
type PSCommand struct {
	ID        string `json:"id"`
	Kind      string `json:"kind"` // PSCommandPoint
	MachineID string `json:"machine_id"`
	App       bool   `json:"app,omitempty"` // PSCommandPoint: application-consistent
	// PSCommandResync: the job, started only while the catalog marks
	// the disk if IfMarked (procserver.Server.StartResync).
	Resync   *replication.ResyncJob `json:"resync,omitempty"`
	IfMarked bool                   `json:"if_marked,omitempty"`
	// PSCommandPrune: delete the points older than Before but the newest
	// and those named by Keep (at most MaxPSPruneKeep), as
	// procserver.Server.PrunePoints.
	Before time.Time `json:"before,omitzero"`
	Keep   []uint64  `json:"keep,omitempty"`
	// PSCommandScrub: a scheduled scrub (procserver.Server.Scrub).
	Scheduled bool `json:"scheduled,omitempty"`
	// PSCommandCheckPoint and PSCommandImage: the recovery point (its
	// id, resolved by the configuration server); PSCommandImage: the
	// disk (its name) and whether damaged blocks are streamed as they
	// are (AcceptDamage).
	PointID      string `json:"point_id,omitempty"`
	Disk         string `json:"disk,omitempty"`
	AcceptDamage bool   `json:"accept_damage,omitempty"`
	// PSCommandGroupCut: the cut the machine takes part in.
	Cut *PSCut `json:"cut,omitempty"`
	// Timeout bounds the command's run (at most MaxPSCommandTimeout).
	Timeout time.Duration `json:"timeout_ns"`
}

// Command kinds.
const (
	// PSCommandPoint asks the machine's agent for a recovery point now
	// (procserver.Server.RequestPoint); the result names it.
	PSCommandPoint = "point"
	// PSCommandResync starts a resync job on the machine's agent; the
	// result says it started (its progress and end come as any resync's).
	PSCommandResync = "resync"
	// PSCommandPrune prunes the machine's points past its retention; the
	// result counts those deleted (the configuration server then rereads
	// the machine's points from the catalog).
	PSCommandPrune = "prune"
	// PSCommandScrub scrubs the machine's replica and points
	// (procserver.Server.Scrub; Scheduled as there); the result is the
	// report, its damaged-block lists cut at MaxPSScrubDamaged each.
	PSCommandScrub = "scrub"
	// PSCommandCheckPoint reads every disk of a recovery point through
	// its checksums (procserver.Server.CheckPoint: `asr verify
	// --point`); the result is a scrub report of that point only
	// (Scrub.Points), cut as a scrub's.
	PSCommandCheckPoint = "check-point"
	// PSCommandImage streams a disk at a recovery point, read through
	// its checksums from the running applier's snapshot (as the built-in
	// process server serves `asr recover`), to the configuration server:
	// a POST of the image to PSImagePath + the command's id, over the
	// process server's mutual TLS; the result is the stream's verdict
	// (Error: why it is incomplete; Damaged: the damaged blocks streamed
	// as they are, with AcceptDamage).
	PSCommandImage = "image"
	// PSCommandGroupCut has the machine take part in a replication
	// group's cut that the configuration server coordinates across
	// process servers (Cut): the process server reports its member's
	// states (POST /api/v1/process-servers/cuts/{id}, PSCutReport) and
	// follows the decisions (PSCutDecision); the result is the member's
	// point, whose Cut is the cut's id.
	PSCommandGroupCut = "groupCut"
)

// PSImagePath is where a scale-out process server POSTs the image a
// PSCommandImage asks for (followed by the command's id): the body is the
// image, exactly HeaderImageSize bytes; HeaderImageChecked as in a
// recovery's stream.
const PSImagePath = "/api/v1/process-servers/images/"

// MaxPSImageDamaged bounds the damaged blocks an image's result lists
// (the built-in process server's stream lists as many).
const MaxPSImageDamaged = 10000

// PSCut is a replication group's cut a scale-out process server's machine
// takes part in (PSCommandGroupCut).
type PSCut struct {
	ID  uint64 `json:"id"` // the tag's request id on every member, and its point's Cut
	App bool   `json:"app,omitempty"`
	// HoldWait bounds the wait for the agent's HELD (at most
	// MaxPSCutHoldWait).
	HoldWait time.Duration `json:"hold_wait_ns"`
}

// MaxPSCutHoldWait bounds PSCut.HoldWait.
const MaxPSCutHoldWait = time.Minute

// PSCutReport is the body of POST /api/v1/process-servers/cuts/{id}: a
// member's state in a cut. The answer (PSCutDecision) comes once the
// configuration server has decided what follows that state, at most
// MaxPSCutPoll later (then PSCutRelease).
type PSCutReport struct {
	MachineID string `json:"machine_id"`
	State     string `json:"state"`           // PSCutReady, PSCutHeld or PSCutFailed
	Error     string `json:"error,omitempty"` // PSCutFailed: why (at most 4096 bytes)
}

// PSCutDecision answers a PSCutReport.
type PSCutDecision struct {
	Action string `json:"action"` // PSCutHold, PSCutCut or PSCutRelease
	Reason string `json:"reason,omitempty"`
}

// A member's states in a cut, and the decisions.
const (
	PSCutReady   = "ready"   // the agent is connected: it can hold when told
	PSCutHeld    = "held"    // the agent holds its writes (HELD)
	PSCutFailed  = "failed"  // it cannot take part: the whole cut is abandoned
	PSCutHold    = "hold"    // every member is ready: hold (HOLD)
	PSCutCut     = "cut"     // every member holds: tag (CUT)
	PSCutRelease = "release" // the cut is abandoned: release (RELEASE), no tag
)

// MaxPSCutPoll bounds how long a PSCutReport waits for its decision.
const MaxPSCutPoll = 30 * time.Second

// MaxPSPruneKeep bounds the points a prune command keeps by name (the
// points of live failovers).
const MaxPSPruneKeep = 10000

// Bounds of a scrub's report in a command result: disks and points listed,
// damaged blocks listed per disk or point and in the whole report (the
// count beyond is in ScrubDamagedNotListed). At its largest a report
// takes about 3 MB of JSON (8,192 entries, 65,536 offsets of up to 20
// bytes), so a heartbeat carries it within MaxPSResultsBytes.
const (
	MaxPSScrubEntries      = 4096
	MaxPSScrubDamaged      = 1024
	MaxPSScrubDamagedTotal = 65536
)

// MaxPSResultsBytes bounds the command results one heartbeat carries (as
// JSON; one result at least): with the news (MaxPSNewsBytes) and the
// figures, a heartbeat stays within the body the configuration server
// reads. The results left out go in the next heartbeats.
const MaxPSResultsBytes = 3 << 20

// MaxPSCommandTimeout bounds a command's run.
const MaxPSCommandTimeout = 30 * time.Minute

// PSCommandResult is a finished command's outcome, sent in every
// heartbeat until the reply no longer names the command.
type PSCommandResult struct {
	ID    string `json:"id"`
	Error string `json:"error,omitempty"`
	// NotConnected says the machine's agent was not connected.
	NotConnected bool `json:"not_connected,omitempty"`
	// NotNeeded says a resync was not started: the catalog no longer
	// marks the disk (procserver.ErrResyncNotNeeded).
	NotNeeded bool `json:"not_needed,omitempty"`
	// Deleted counts the points a prune deleted.
	Deleted int `json:"deleted,omitempty"`
	// Scrub is a scrub's report (a point check's: its Points only);
	// ScrubDamagedNotListed counts the damaged blocks its lists leave out
	// (past MaxPSScrubDamaged each).
	Scrub                 *procserver.ScrubReport `json:"scrub,omitempty"`
	ScrubDamagedNotListed int64                   `json:"scrub_damaged_not_listed,omitempty"`
	Point                 *replication.Point      `json:"point,omitempty"`
	// Damaged are the offsets of the damaged blocks an image streamed as
	// they are (PSCommandImage with AcceptDamage), at most
	// MaxPSImageDamaged; DamagedNotListed counts those past it.
	Damaged          []int64 `json:"damaged,omitempty"`
	DamagedNotListed int64   `json:"damaged_not_listed,omitempty"`
}
