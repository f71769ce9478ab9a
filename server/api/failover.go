package api

import (
	"time"
)

// Failover kinds and destinations.
const (
	FailoverTest = "test"     // a test failover: thrown away at cleanup
	FailoverReal = "failover" // the machine now runs from the recovered disks

	ToNBD     = "nbd"     // the server's own read-write NBD exports
	ToQEMU    = "qemu"    // a verified drill: QEMU boots the exports in an isolated network
	ToVSphere = "vsphere" // a VM created in a registered vCenter
	ToAzure   = "azure"   // managed disks and a VM in Azure
)

// FailoverRequest starts a test failover or a failover (POST
// /api/v1/failovers) of one machine, the members of a replication group
// (at one of the group's cuts) or a recovery plan.
type FailoverRequest struct {
	Machine string `json:"machine,omitempty"`
	Group   string `json:"group,omitempty"`
	Plan    string `json:"plan,omitempty"`
	Test    bool   `json:"test,omitempty"`
	// Planned shuts the source down and takes a last point first (a
	// failover only): no acknowledged write is lost.
	Planned bool `json:"planned,omitempty"`
	// Point is a point id, "latest" (default) or "latest-app"; with a
	// group, a group point id. Time, inside the any-point window, is the
	// alternative.
	Point string     `json:"point,omitempty"`
	Time  *time.Time `json:"time,omitempty"`
	To    string     `json:"to"`

	// --to qemu: the boot check (a regexp on the serial console, and/or a
	// TCP port that must answer) and how long the guest has to pass it.
	BootCheck   string  `json:"boot_check,omitempty"`
	BootPort    int     `json:"boot_port,omitempty"`
	BootTimeout float64 `json:"boot_timeout_seconds,omitempty"`

	VSphere *VSphereTarget `json:"vsphere,omitempty"`
	Azure   *AzureTarget   `json:"azure,omitempty"`
}

// VSphereTarget is where a failover to vSphere creates the VM.
type VSphereTarget struct {
	VCenter   string `json:"vcenter"`
	Datastore string `json:"datastore"`
	Host      string `json:"host,omitempty"`
	Pool      string `json:"pool,omitempty"`
	// Folder is the VM folder (name or inventory path) of the new VM; ""
	// is the data center's VM folder.
	Folder  string `json:"folder,omitempty"`
	Network string `json:"network,omitempty"`
	// PowerOn powers a test failover's VM on (a failover's always is).
	PowerOn bool `json:"power_on,omitempty"`
}

// AzureTarget is where a failover to Azure creates the VM.
type AzureTarget struct {
	Subscription  string `json:"subscription"`
	ResourceGroup string `json:"resource_group"`
	Location      string `json:"location"`
	VNet          string `json:"vnet"`
	Subnet        string `json:"subnet"`
	Size          string `json:"size,omitempty"`
}

// FailoverAction acts on the live failover of a machine, group or plan:
// cleanup (a test failover), commit, or change-point (POST
// /api/v1/failovers/{action}).
type FailoverAction struct {
	Machine string     `json:"machine,omitempty"`
	Group   string     `json:"group,omitempty"`
	Plan    string     `json:"plan,omitempty"`
	Point   string     `json:"point,omitempty"` // change-point
	Time    *time.Time `json:"time,omitempty"`  // change-point
}

// Failover is a machine's failover (GET /api/v1/failovers).
type Failover struct {
	ID        string `json:"id"`
	Machine   string `json:"machine"`
	MachineID string `json:"machine_id"`
	Kind      string `json:"kind"` // test | failover
	// Planned: the source was shut down and a last point taken first
	// (only a planned failover to NBD can be failed back).
	Planned   bool       `json:"planned,omitempty"`
	To        string     `json:"to"`
	State     string     `json:"state"` // starting | active | committed | failed | ended
	Point     string     `json:"point"`
	PointTime time.Time  `json:"point_time,omitzero"`
	Time      *time.Time `json:"time,omitempty"` // --time
	Plan      string     `json:"plan,omitempty"`
	JobID     string     `json:"job_id,omitempty"`
	Created   time.Time  `json:"created"`
	Ended     time.Time  `json:"ended,omitzero"`
	Exports   []Export   `json:"exports,omitempty"`
	// VM names what a failover to vSphere or Azure created.
	VM    string       `json:"vm,omitempty"`
	Drill *DrillResult `json:"drill,omitempty"`
	// Failback is the failback's progress once the failover is
	// reprotected (asr reprotect, asr failback).
	Failback *FailbackStatus `json:"failback,omitempty"`
}

// FailbackStatus is where a failover's failback is.
type FailbackStatus struct {
	State string `json:"state"` // reprotected | failing-back | failed-back
	// Sent is the bytes written back to the original disks; Pending, the
	// bytes written to the exports not yet on them (live failovers only);
	// Compared, the bytes the failback's verification compared.
	Sent     int64 `json:"sent"`
	Pending  int64 `json:"pending"`
	Compared int64 `json:"compared"`
	// Forward is "done" once the machine is protected forward again;
	// Resynced and Resent are that resync's bytes compared and sent.
	Forward  string `json:"forward,omitempty"`
	Resynced int64  `json:"resynced,omitempty"`
	Resent   int64  `json:"resent,omitempty"`
	// Checksum is the checksum compare of an unplanned failover's
	// reprotect (the original disks against the failed-over state).
	Checksum *FailbackChecksum `json:"checksum,omitempty"`
	// VM is the new VM of an alternate-location failback (VCENTER/NAME);
	// "" for the original location.
	VM string `json:"vm,omitempty"`
}

// FailbackChecksum is where the checksum compare of an unplanned
// failover's reprotect is: State waiting-for-agent (the original agent
// must connect and be frozen first), comparing or done; Compared of
// Total bytes compared; Differ, the bytes found different (marked to be
// sent); Waiting, why it waits now, if it does; Thawed, the times the
// original agent was found no longer frozen under the failover (thawed
// by hand, its state lost) while compared, sent to or verified: frozen
// again each time and compared again from the start (a planned
// failover's reprotect has a compare only from the first of them).
type FailbackChecksum struct {
	State    string `json:"state"`
	Total    int64  `json:"total"`
	Compared int64  `json:"compared"`
	Differ   int64  `json:"differ"`
	Waiting  string `json:"waiting,omitempty"`
	Thawed   int    `json:"thawed,omitempty"`
}

// Export is one recovered disk served over NBD.
type Export struct {
	Disk string `json:"disk"`
	URI  string `json:"uri"` // nbd://HOST:PORT/MACHINE/DISK
	// Socket is the same export on the server's UNIX socket (nbd+unix).
	Socket  string `json:"socket_uri,omitempty"`
	Size    int64  `json:"size"`
	Written int64  `json:"written_bytes"` // written since the failover (64 KiB blocks)
}

// DrillResult is what a verified drill found.
type DrillResult struct {
	Passed   bool    `json:"passed"`
	BootTime float64 `json:"boot_seconds"`
	Accel    string  `json:"accel,omitempty"`
	Reason   string  `json:"reason,omitempty"`
	Console  string  `json:"console_tail,omitempty"`
}
