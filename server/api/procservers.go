package api

import (
	"time"

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
}

// PSAssignment is a machine a scale-out process server serves.
type PSAssignment struct {
	MachineID  string `json:"machine_id"`
	Name       string `json:"name"`
	CertSerial string `json:"cert_serial"`
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
		CacheError: f.CacheError, Target: target,
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
