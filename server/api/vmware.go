package api

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"time"
)

// VCenter is a registered vCenter (or ESXi host) and its discovery's state
// (GET /api/v1/vcenters). The password is never returned.
type VCenter struct {
	Name       string    `json:"name"`
	URL        string    `json:"url"`
	User       string    `json:"user"`
	Thumbprint string    `json:"thumbprint"` // pinned SHA-256 of its certificate
	AddedAt    time.Time `json:"added_at"`
	Connected  bool      `json:"connected"`
	LastUpdate time.Time `json:"last_update,omitzero"` // last inventory change or check
	LastError  string    `json:"last_error,omitempty"`
	About      string    `json:"about,omitempty"` // product and version the vCenter reports
	VMs        int       `json:"vms"`
}

// AddVCenterRequest is the body of POST /api/v1/vcenters. An empty
// Thumbprint is refused with ErrorBody.Thumbprint set to the certificate's:
// the operator confirms it and sends it back.
type AddVCenterRequest struct {
	Name       string `json:"name"`
	URL        string `json:"url"`
	User       string `json:"user"`
	Password   string `json:"password"`
	Thumbprint string `json:"thumbprint"`
}

// VM is a virtual machine of the inventory (GET /api/v1/vms): what
// discovery found (the JSON of vmware.VM) and how asr relates to it.
type VM struct {
	VCenter       string   `json:"vcenter"`
	Ref           string   `json:"ref"`
	Name          string   `json:"name"`
	BIOSUUID      string   `json:"bios_uuid"`
	InstanceUUID  string   `json:"instance_uuid"`
	PowerState    string   `json:"power_state"`
	GuestOS       string   `json:"guest_os"`
	IPs           []string `json:"ips,omitempty"`
	GuestHostName string   `json:"guest_host_name,omitempty"`
	CPUs          int32    `json:"cpus"`
	MemoryMiB     int32    `json:"memory_mib"`
	Disks         []VMDisk `json:"disks"`
	Host          string   `json:"host"`
	Cluster       string   `json:"cluster"`
	Folder        string   `json:"folder"`
	ResourcePool  string   `json:"resource_pool"`
	Datastores    []string `json:"datastores"`
	Networks      []string `json:"networks"`
	Template      bool     `json:"template,omitempty"`

	// Stale is set while the vCenter cannot be reached: the VM is as last
	// seen. Machine is the asr machine protecting it ("" if none);
	// Duplicate says another VM has the same BIOS UUID (a clone), so no
	// machine is linked to either.
	Stale     bool      `json:"stale"`
	UpdatedAt time.Time `json:"updated_at"`
	Machine   string    `json:"machine"`
	Duplicate bool      `json:"duplicate_uuid,omitempty"`
}

// VMDisk is a virtual disk of a VM.
type VMDisk struct {
	Key           int32  `json:"key"`
	Label         string `json:"label"`
	CapacityBytes int64  `json:"capacity_bytes"`
	Path          string `json:"path"`
	Datastore     string `json:"datastore"`
	Controller    string `json:"controller"`
	ControllerKey int32  `json:"controller_key"`
	Unit          int32  `json:"unit"`
}

// VMLink is the VM a machine is linked to, as its row in the console
// shows it.
type VMLink struct {
	VCenter string   `json:"vcenter"`
	Ref     string   `json:"ref"`
	Name    string   `json:"name"`
	Host    string   `json:"host"`
	IPs     []string `json:"ips,omitempty"`
	Stale   bool     `json:"stale,omitempty"`
}

// Problems linking a machine to a VM (Machine.LinkProblem): asr never
// guesses a link.
const (
	LinkNoUUID    = "the agent reports no BIOS UUID"
	LinkNoVM      = "no VM in the inventory has this BIOS UUID"
	LinkDuplicate = "several VMs have this BIOS UUID (cloned VMs): not linked"
	LinkShared    = "another machine reports the same BIOS UUID: not linked"
)

// ProtectRequest is the body of POST /api/v1/protect: push the agent to a
// VM's guest over SSH and protect the given disks (a job).
type ProtectRequest struct {
	VCenter string `json:"vcenter,omitempty"` // "" if the VM name is unique across vCenters
	VM      string `json:"vm"`
	// SSH is USER@HOST[:PORT] of the guest; Key the private key (PEM),
	// used for this job only: never stored or logged.
	SSH           string        `json:"ssh"`
	Key           string        `json:"key"`
	KnownHosts    string        `json:"known_hosts,omitempty"`     // known_hosts lines the guest's host key must match
	AcceptHostKey string        `json:"accept_host_key,omitempty"` // SHA256:... the operator confirmed for a host not yet known
	Disks         []ProtectDisk `json:"disks"`
	Mode          string        `json:"mode,omitempty"` // "nbd" (default) or "scan"
	Policy        string        `json:"policy,omitempty"`
	InstallDir    string        `json:"install_dir,omitempty"`
	NBD           string        `json:"nbd,omitempty"`
	SkipUUIDCheck bool          `json:"skip_uuid_check,omitempty"`
	// ServerURL is the control URL the guest's agent registers with
	// (default: the server's advertised URL).
	ServerURL string `json:"server_url,omitempty"`
}

// ProtectDisk maps a protected disk's name to the guest's device.
type ProtectDisk struct {
	Name   string `json:"name"`
	Device string `json:"device"`
}

// UnprotectVMRequest is the body of POST /api/v1/vms/unprotect: remove
// the agent from the guest over SSH and end the machine's protection.
type UnprotectVMRequest struct {
	VCenter       string `json:"vcenter,omitempty"`
	VM            string `json:"vm"`
	SSH           string `json:"ssh"`
	Key           string `json:"key"`
	KnownHosts    string `json:"known_hosts,omitempty"`
	AcceptHostKey string `json:"accept_host_key,omitempty"`
	InstallDir    string `json:"install_dir,omitempty"`
	DeleteReplica bool   `json:"delete_replica,omitempty"`
}

// Job states.
const (
	JobRunning   = "running"
	JobSucceeded = "succeeded"
	JobFailed    = "failed"
	JobCancelled = "cancelled"
)

// Job is a long operation (a push install, an unprotect) with its steps
// (GET /api/v1/jobs/{id}).
type Job struct {
	ID        string    `json:"id"`
	Kind      string    `json:"kind"`
	Subject   string    `json:"subject"`
	State     string    `json:"state"`
	Error     string    `json:"error,omitempty"`
	Steps     []JobStep `json:"steps"`
	StartedAt time.Time `json:"started_at"`
	EndedAt   time.Time `json:"ended_at,omitzero"`
	// Output is the job's result lines (a failover's "DISK URI" lines).
	Output []string `json:"output,omitempty"`
	// RTO is the measured time from the start until the recovered
	// machines were usable, in seconds (failovers and drills).
	RTO float64 `json:"rto_seconds,omitempty"`
	// Waiting is the manual action the job waits on: it goes on when an
	// operator confirms it (POST /api/v1/jobs/{id}/confirm).
	Waiting string `json:"waiting,omitempty"`
	// Cancellable says POST /api/v1/jobs/{id}/cancel may stop it now.
	Cancellable bool `json:"cancellable,omitempty"`
	// Machines are the machines a running plan's (or replication
	// group's) reprotect or failback acts on, by name: a machine's page
	// shows that job as its own. Not kept once the job ends.
	Machines []string `json:"machines,omitempty"`
}

// JobStep is one step of a job; Done and Total count bytes where the step
// moves data (the copy of the agent's binary).
type JobStep struct {
	Name   string `json:"name"`
	State  string `json:"state"` // running, done, failed, skipped
	Detail string `json:"detail,omitempty"`
	Done   int64  `json:"done,omitempty"`
	Total  int64  `json:"total,omitempty"`
}

// ErrorBody is the JSON of an error answer. Thumbprint or HostKey are set
// when the request needs the operator to confirm an identity first.
type ErrorBody struct {
	Error      string `json:"error"`
	Thumbprint string `json:"thumbprint,omitempty"`
	HostKey    string `json:"host_key,omitempty"`
}

// JobVersion is a job's change marker (GET /api/v1/jobs/{id}?wait=V waits
// until it differs from V): it changes whenever the job's state, error or
// any step does.
func JobVersion(j Job) string {
	b, _ := json.Marshal(struct {
		State, Error, Waiting string
		Steps                 []JobStep
		Output                []string
		Cancellable           bool
	}{j.State, j.Error, j.Waiting, j.Steps, j.Output, j.Cancellable})
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:8])
}
