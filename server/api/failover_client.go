package api

import (
	"context"
	"net/http"
	"net/url"
)

// StartFailover starts a test failover, a failover or a drill (a job).
func (c *Client) StartFailover(ctx context.Context, req FailoverRequest) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/failovers", req, &j)
	return j, err
}

// FailoverAction runs cleanup, commit or change-point (a job).
func (c *Client) FailoverAction(ctx context.Context, action string, a FailoverAction) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/failovers/"+url.PathEscape(action), a, &j)
	return j, err
}

// Failovers lists the live failovers (all: the ended ones too).
func (c *Client) Failovers(ctx context.Context, all bool) ([]Failover, error) {
	p := "/api/v1/failovers"
	if all {
		p += "?all=1"
	}
	var fs []Failover
	err := c.Do(ctx, http.MethodGet, p, nil, &fs)
	return fs, err
}

// ConfirmJob confirms the manual action a job waits on.
func (c *Client) ConfirmJob(ctx context.Context, id string) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/jobs/"+url.PathEscape(id)+"/confirm", nil, &j)
	return j, err
}

// CancelJob cancels a job that may be stopped now.
func (c *Client) CancelJob(ctx context.Context, id string) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/jobs/"+url.PathEscape(id)+"/cancel", nil, &j)
	return j, err
}

// CreatePlan creates a recovery plan.
func (c *Client) CreatePlan(ctx context.Context, p Plan) (Plan, error) {
	var out Plan
	err := c.Do(ctx, http.MethodPost, "/api/v1/plans", p, &out)
	return out, err
}

// Plans lists the recovery plans.
func (c *Client) Plans(ctx context.Context) ([]Plan, error) {
	var ps []Plan
	err := c.Do(ctx, http.MethodGet, "/api/v1/plans", nil, &ps)
	return ps, err
}

// Plan returns a recovery plan.
func (c *Client) Plan(ctx context.Context, name string) (Plan, error) {
	var p Plan
	err := c.Do(ctx, http.MethodGet, "/api/v1/plans/"+url.PathEscape(name), nil, &p)
	return p, err
}

// DeletePlan deletes a recovery plan.
func (c *Client) DeletePlan(ctx context.Context, name string) error {
	return c.Do(ctx, http.MethodDelete, "/api/v1/plans/"+url.PathEscape(name), nil, nil)
}

// Reprotect reprotects a machine in the direction it needs (a job):
// toward its original disks after a committed planned failover to NBD,
// forward again after a failback.
func (c *Client) Reprotect(ctx context.Context, machine string) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/machines/"+url.PathEscape(machine)+"/reprotect", nil, &j)
	return j, err
}

// Failback fails a reprotected machine back to its original disks (a job).
func (c *Client) Failback(ctx context.Context, machine string) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/machines/"+url.PathEscape(machine)+"/failback", nil, &j)
	return j, err
}

// ReprotectPlan reprotects a recovery plan's machines (a job): toward
// their original disks after the plan's committed planned failover to
// NBD, forward again after the plan's failback.
func (c *Client) ReprotectPlan(ctx context.Context, plan string) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/plans/"+url.PathEscape(plan)+"/reprotect", nil, &j)
	return j, err
}

// FailbackPlan fails a reprotected plan back to its original machines (a
// job): shut down last group first, drain and verify all, switch all at
// once, power on in the plan's order.
func (c *Client) FailbackPlan(ctx context.Context, plan string) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/plans/"+url.PathEscape(plan)+"/failback", nil, &j)
	return j, err
}

// ReprotectGroup reprotects a replication group's machines as
// ReprotectPlan does a plan's (the failovers no plan made).
func (c *Client) ReprotectGroup(ctx context.Context, group string) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/groups/"+url.PathEscape(group)+"/reprotect", nil, &j)
	return j, err
}

// FailbackGroup fails a reprotected replication group back (a job): every
// member stopped, drained and verified, then all switched at once.
func (c *Client) FailbackGroup(ctx context.Context, group string) (Job, error) {
	var j Job
	err := c.Do(ctx, http.MethodPost, "/api/v1/groups/"+url.PathEscape(group)+"/failback", nil, &j)
	return j, err
}
