package api

import (
	"context"
	"net/http"
	"net/url"
)

// FailbackRequest is how a reprotected (or committed) machine fails back
// (POST /api/v1/machines/{m}/failback). An empty body, or Alternate
// false, is the original location: the original disks, through the
// original agent.
type FailbackRequest struct {
	// Alternate fails back to a new VM made in a vCenter (VSphere: the
	// vCenter and datastore, optionally the host, pool and network, as
	// a failover to vSphere takes them; power_on is not taken, the VM is
	// powered on once its disks are verified) with a full copy of each
	// failed-over disk. The original disks are not touched.
	Alternate bool           `json:"alternate,omitempty"`
	VSphere   *VSphereTarget `json:"vsphere,omitempty"`
	// VMName names the new VM; "" is the linked VM's (else the
	// machine's) name followed by "-failback".
	VMName string `json:"vm_name,omitempty"`
}

// FailbackTo fails a machine back as req says (a job): to its original
// disks, or to a new VM (req.Alternate).
func (c *Client) FailbackTo(ctx context.Context, machine string, req FailbackRequest) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/machines/"+url.PathEscape(machine)+"/failback", req, &j)
	return j, err
}
