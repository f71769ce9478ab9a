package api

import (
	"context"
	"net/http"
	"net/url"
)

// AddVCenter registers a vCenter. Without a thumbprint the server answers
// with an *Error whose Body.Thumbprint is the certificate's, to confirm.
func (c *Client) AddVCenter(ctx context.Context, req AddVCenterRequest) (VCenter, error) {
	var v VCenter
	err := c.Do(ctx, http.MethodPost, "/api/v1/vcenters", req, &v)
	return v, err
}

// VCenters lists the registered vCenters.
func (c *Client) VCenters(ctx context.Context) ([]VCenter, error) {
	var vs []VCenter
	err := c.Do(ctx, http.MethodGet, "/api/v1/vcenters", nil, &vs)
	return vs, err
}

// RemoveVCenter removes a vCenter and its inventory.
func (c *Client) RemoveVCenter(ctx context.Context, name string) error {
	return c.Do(ctx, http.MethodDelete, "/api/v1/vcenters/"+url.PathEscape(name), nil, nil)
}

// VMs lists the inventory, of one vCenter unless vcenter is "".
func (c *Client) VMs(ctx context.Context, vcenter string) ([]VM, error) {
	p := "/api/v1/vms"
	if vcenter != "" {
		p += "?vcenter=" + url.QueryEscape(vcenter)
	}
	var vs []VM
	err := c.Do(ctx, http.MethodGet, p, nil, &vs)
	return vs, err
}

// Protect starts a push install (a job).
func (c *Client) Protect(ctx context.Context, req ProtectRequest) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/protect", req, &j)
	return j, err
}

// UnprotectVM starts the removal of a VM's agent and the end of its
// protection (a job).
func (c *Client) UnprotectVM(ctx context.Context, req UnprotectVMRequest) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/vms/unprotect", req, &j)
	return j, err
}

// Job returns a job.
func (c *Client) Job(ctx context.Context, id string) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodGet, "/api/v1/jobs/"+url.PathEscape(id), nil, &j)
	return j, err
}

// Jobs lists the newest jobs first.
func (c *Client) Jobs(ctx context.Context) ([]Job, error) {
	var js []Job
	err := c.Do(ctx, http.MethodGet, "/api/v1/jobs", nil, &js)
	return js, err
}

// WaitJob follows a job until it ends, calling seen with each new state
// of it, and returns its last state. The server holds each request until
// the job changes (or 25 s pass), so this is not a busy poll.
func (c *Client) WaitJob(ctx context.Context, id string, seen func(Job)) (Job, error) {
	var last Job
	version := ""
	for {
		var j Job
		p := "/api/v1/jobs/" + url.PathEscape(id) + "?wait=" + url.QueryEscape(version)
		if err := c.Do(ctx, http.MethodGet, p, nil, &j); err != nil {
			return last, err
		}
		if v := JobVersion(j); v != version {
			version = v
			if seen != nil {
				seen(j)
			}
		}
		last = j
		if j.State != JobRunning {
			return j, nil
		}
	}
}
