package server

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/argon2id"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
	"github.com/asrdr/asr/web"
)

// sessionTTL is how long a console login lasts.
const sessionTTL = 12 * time.Hour

// consoleBackend adapts the server to web.Backend.
type consoleBackend struct{ s *Server }

var _ web.Backend = consoleBackend{}

func (b consoleBackend) Machines(ctx context.Context) ([]api.Machine, error) {
	return b.s.Machines(ctx)
}

func (b consoleBackend) CheckSecret(ctx context.Context, secret string) bool {
	if subtle.ConstantTimeCompare([]byte(secret), []byte(b.s.token)) == 1 {
		return true
	}
	return b.s.checkPassword(ctx, secret)
}

func (b consoleBackend) HasPassword(ctx context.Context) bool {
	_, err := b.s.db.Setting(ctx, "console_password")
	return err == nil
}

func (b consoleBackend) SetPassword(ctx context.Context, pw string) error {
	return b.s.SetPassword(ctx, pw)
}

func (b consoleBackend) CreateSession(ctx context.Context) (string, string, error) {
	return b.s.db.CreateSession(ctx, sessionTTL)
}

func (b consoleBackend) Session(ctx context.Context, id string) (string, error) {
	return b.s.db.Session(ctx, id)
}

func (b consoleBackend) DeleteSession(ctx context.Context, id string) error {
	return b.s.db.DeleteSession(ctx, id)
}

func (b consoleBackend) ProcessServer(context.Context) (api.ProcessServer, error) {
	return b.s.ProcessServer(), nil
}

func (b consoleBackend) ProcessServers(ctx context.Context) ([]api.ProcessServerInfo, error) {
	return b.s.ProcessServers(ctx)
}

func (b consoleBackend) SwitchProcessServer(ctx context.Context, machine, to string) (string, error) {
	return b.s.SwitchProcessServer(ctx, machine, to)
}

func (b consoleBackend) SwitchAll(ctx context.Context, from, to string) ([]string, error) {
	return b.s.SwitchAll(ctx, from, to)
}

func (b consoleBackend) StartResync(ctx context.Context, machineID, disk string) error {
	m, err := b.s.db.Machine(ctx, machineID)
	if err != nil {
		return err
	}
	_, err = b.s.RequestResync(ctx, m, disk)
	return err
}

func (b consoleBackend) VCenters(ctx context.Context) ([]api.VCenter, error) {
	return b.s.VCenters(ctx)
}

func (b consoleBackend) AddVCenter(ctx context.Context, req api.AddVCenterRequest) (api.VCenter, string, error) {
	v, err := b.s.AddVCenter(ctx, req)
	var ae *apiError
	if errors.As(err, &ae) {
		return v, ae.thumbprint, err
	}
	return v, "", err
}

func (b consoleBackend) RemoveVCenter(ctx context.Context, name string) error {
	err := b.s.RemoveVCenter(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return fmt.Errorf("vCenter %s: %w", name, web.ErrNotFound)
	}
	return err
}

func (b consoleBackend) VMs(ctx context.Context) ([]api.VM, error) {
	return b.s.VMs(ctx, "")
}

func (b consoleBackend) Policies(ctx context.Context) ([]api.PolicyJSON, error) {
	ps, err := b.s.db.Policies(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]api.PolicyJSON, len(ps))
	for i, p := range ps {
		out[i] = policyJSON(p)
	}
	return out, nil
}

func (b consoleBackend) Protect(ctx context.Context, req api.ProtectRequest) (api.Job, string, error) {
	j, err := b.s.Protect(ctx, req)
	var ae *apiError
	if errors.As(err, &ae) {
		return j, ae.hostKey, err
	}
	return j, "", err
}

func (b consoleBackend) Jobs(ctx context.Context, limit int) ([]api.Job, error) {
	return b.s.Jobs(ctx, limit)
}

func (b consoleBackend) Job(ctx context.Context, id string) (api.Job, error) {
	j, err := b.s.Job(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return j, fmt.Errorf("job %s: %w", id, web.ErrNotFound)
	}
	return j, err
}

func (b consoleBackend) ConfirmJob(ctx context.Context, id string) error {
	return notFound(b.s.ConfirmJob(ctx, id), "job "+id)
}

func (b consoleBackend) CancelJob(ctx context.Context, id string) error {
	return notFound(b.s.CancelJob(ctx, id), "job "+id)
}

func (b consoleBackend) Points(ctx context.Context, machine string) ([]api.PointJSON, error) {
	m, err := b.s.db.MachineByName(ctx, machine)
	if errors.Is(err, store.ErrNotFound) {
		return nil, fmt.Errorf("machine %s: %w", machine, web.ErrNotFound)
	}
	if err != nil {
		return nil, err
	}
	ps, err := b.s.cat.Points(ctx, m.ID)
	if err != nil {
		return nil, err
	}
	out := make([]api.PointJSON, len(ps))
	for i, p := range ps {
		out[i] = api.PointOf(p)
	}
	return out, nil
}

func (b consoleBackend) Failovers(ctx context.Context) ([]api.Failover, error) {
	return b.s.Failovers(ctx, false)
}

func (b consoleBackend) StartFailover(ctx context.Context, req api.FailoverRequest) (api.Job, error) {
	return b.s.StartFailover(ctx, req)
}

func (b consoleBackend) Cleanup(ctx context.Context, a api.FailoverAction) (api.Job, error) {
	return b.s.Cleanup(ctx, a)
}

func (b consoleBackend) Commit(ctx context.Context, a api.FailoverAction) (api.Job, error) {
	return b.s.Commit(ctx, a)
}

func (b consoleBackend) ChangePoint(ctx context.Context, a api.FailoverAction) (api.Job, error) {
	return b.s.ChangePoint(ctx, a)
}

func (b consoleBackend) Reprotect(ctx context.Context, machine string) (api.Job, error) {
	return b.s.Reprotect(ctx, machine)
}

func (b consoleBackend) Failback(ctx context.Context, machine string) (api.Job, error) {
	return b.s.Failback(ctx, machine)
}

func (b consoleBackend) FailbackTo(ctx context.Context, machine string, req api.FailbackRequest) (api.Job, error) {
	return b.s.FailbackTo(ctx, machine, req)
}

func (b consoleBackend) ReprotectPlan(ctx context.Context, plan string) (api.Job, error) {
	return b.s.ReprotectPlan(ctx, plan)
}

func (b consoleBackend) FailbackPlan(ctx context.Context, plan string) (api.Job, error) {
	return b.s.FailbackPlan(ctx, plan)
}

func (b consoleBackend) Plans(ctx context.Context) ([]api.Plan, error) {
	return b.s.Plans(ctx)
}

func (b consoleBackend) CreatePlan(ctx context.Context, p api.Plan) (api.Plan, error) {
	return b.s.CreatePlan(ctx, p, false)
}

func (b consoleBackend) DeletePlan(ctx context.Context, name string) error {
	return notFound(b.s.DeletePlan(ctx, name), "plan "+name)
}

func (b consoleBackend) MachineEvents(ctx context.Context, machine string, limit int) ([]api.EventJSON, error) {
	m, err := b.s.db.MachineByName(ctx, machine)
	if err != nil {
		return nil, notFound(err, "machine "+machine)
	}
	return b.s.Events(ctx, m.ID, limit)
}

func (b consoleBackend) History(ctx context.Context, machine string, since time.Time) ([]api.HistorySample, error) {
	h, err := b.s.History(ctx, machine, since)
	return h, notFound(err, "machine "+machine)
}

// consoleTagTimeout bounds how long the console waits for a point it asked
// for (the API's default is 2 minutes; a browser gives up sooner).
const consoleTagTimeout = time.Minute

func (b consoleBackend) Tag(ctx context.Context, machine string, app bool) (api.PointJSON, error) {
	m, err := b.s.db.MachineByName(ctx, machine)
	if err != nil {
		return api.PointJSON{}, notFound(err, "machine "+machine)
	}
	ctx, cancel := context.WithTimeout(ctx, consoleTagTimeout)
	defer cancel()
	p, err := b.s.tag(ctx, m, app)
	if err != nil {
		return api.PointJSON{}, err
	}
	return api.PointOf(p), nil
}

func (b consoleBackend) CreatePolicy(ctx context.Context, p api.PolicyJSON) (api.PolicyJSON, error) {
	return b.s.CreatePolicy(ctx, p)
}

func (b consoleBackend) UpdatePolicy(ctx context.Context, name string, p api.PolicyJSON) (api.PolicyJSON, error) {
	out, err := b.s.UpdatePolicy(ctx, name, p)
	return out, notFound(err, "policy "+name)
}

func (b consoleBackend) AssignPolicy(ctx context.Context, machine, policy string) error {
	m, err := b.s.db.MachineByName(ctx, machine)
	if err != nil {
		return notFound(err, "machine "+machine)
	}
	return b.s.assignPolicy(ctx, m, policy)
}

func (b consoleBackend) SetGroup(ctx context.Context, machine, group string) error {
	m, err := b.s.db.MachineByName(ctx, machine)
	if err != nil {
		return notFound(err, "machine "+machine)
	}
	return b.s.setGroup(ctx, m, group)
}

func (b consoleBackend) GroupPoints(ctx context.Context, group string) ([]api.GroupPointJSON, error) {
	gps, err := b.s.cat.GroupPoints(ctx, group)
	if err != nil {
		return nil, err
	}
	out := make([]api.GroupPointJSON, len(gps))
	for i, gp := range gps {
		out[i] = b.s.groupPointJSON(ctx, gp)
	}
	return out, nil
}

func (b consoleBackend) GroupTag(ctx context.Context, group string, app bool) (api.GroupPointJSON, error) {
	ctx, cancel := context.WithTimeout(ctx, consoleTagTimeout)
	defer cancel()
	gp, err := b.s.groupCut(ctx, group, app)
	if err != nil {
		return api.GroupPointJSON{}, err
	}
	return b.s.groupPointJSON(ctx, gp), nil
}

// notFound translates the server's not-found errors (the store's, or an
// API error with status 404) into web.ErrNotFound.
func notFound(err error, what string) error {
	var ae *apiError
	if errors.Is(err, store.ErrNotFound) || (errors.As(err, &ae) && ae.status == http.StatusNotFound) {
		return fmt.Errorf("%s: %w", what, web.ErrNotFound)
	}
	return err
}

// console returns the web console handler.
func (s *Server) console() http.Handler {
	return web.New(consoleBackend{s}, web.Options{Logger: s.log, ServerURL: s.URL()})
}

// MinPasswordLen is the shortest console password accepted.
const MinPasswordLen = 12

// SetPassword sets the console password (stored as an Argon2id hash).
func (s *Server) SetPassword(ctx context.Context, pw string) error {
	if len(pw) < MinPasswordLen {
		return fmt.Errorf("the console password must have at least %d characters", MinPasswordLen)
	}
	salt := make([]byte, 16)
	rand.Read(salt)
	h := argon2id.IDKey([]byte(pw), salt, 2, 64<<10, 2, 32)
	return s.db.SetSetting(ctx, "console_password",
		base64.RawStdEncoding.EncodeToString(salt)+"$"+base64.RawStdEncoding.EncodeToString(h))
}

func (s *Server) checkPassword(ctx context.Context, pw string) bool {
	v, err := s.db.Setting(ctx, "console_password")
	if err != nil {
		return false
	}
	var saltB, hashB string
	for i := 0; i < len(v); i++ {
		if v[i] == '$' {
			saltB, hashB = v[:i], v[i+1:]
		}
	}
	salt, err1 := base64.RawStdEncoding.DecodeString(saltB)
	want, err2 := base64.RawStdEncoding.DecodeString(hashB)
	if err1 != nil || err2 != nil {
		return false
	}
	got := argon2id.IDKey([]byte(pw), salt, 2, 64<<10, 2, 32)
	return subtle.ConstantTimeCompare(got, want) == 1
}

// Machines returns every machine as the console and the API show it.
func (s *Server) Machines(ctx context.Context) ([]api.Machine, error) {
	ms, err := s.db.Machines(ctx)
	if err != nil {
		return nil, err
	}
	l, _, err := s.links(ctx, false)
	if err != nil {
		return nil, err
	}
	out := make([]api.Machine, 0, len(ms))
	for _, m := range ms {
		v, err := s.machineView(ctx, m, l)
		if err != nil {
			return nil, err
		}
		v.Direction = s.directionOf(ctx, m.ID)
		v.Reverse = s.reverseStatus(ctx, m)
		v.ReverseSource = s.reverseSource(ctx, m.ID)
		out = append(out, v)
	}
	return out, nil
}

// machineView summarises a machine: state over its disks, the current RPO,
// the last recovery point, process-server figures, its VM (l: the links
// of machines to VMs, nil to look them up).
func (s *Server) machineView(ctx context.Context, m store.Machine, l *links) (api.Machine, error) {
	if l == nil {
		var err error
		if l, _, err = s.links(ctx, false); err != nil {
			return api.Machine{}, err
		}
	}
	// Received bytes: the database's count and what is not added to it
	// yet; never less than shown before (m may have been read before a
	// flush moved the pending bytes into the database).
	s.bytesMu.Lock()
	received := m.BytesReceived + s.bytes[m.ID]
	if s.bytesShown == nil {
		s.bytesShown = map[string]int64{}
	}
	received = max(received, s.bytesShown[m.ID])
	s.bytesShown[m.ID] = received
	s.bytesMu.Unlock()
	v := api.Machine{ID: m.ID, Name: m.Name, AgentVersion: m.AgentVersion, LastSeen: m.LastSeen,
		BytesReceived: received, Error: m.LastError, State: replication.StateProtected,
		Policy: m.Policy, Group: m.Group, LastScrub: m.LastScrub, ScrubResult: m.ScrubResult,
		ScrubDamage: m.ScrubOutcome == store.ScrubDamaged || m.ScrubOutcome == store.ScrubFailed}
	l.link(&v, m.BIOSUUID)
	modes := map[string]string{}
	if m.DiskModes != "" {
		json.Unmarshal([]byte(m.DiskModes), &modes)
	}
	var total, copied int64
	for _, d := range m.Disks {
		wd := api.Disk{Index: d.Index, Name: d.Name, Size: d.Size, State: d.State, Reason: d.Reason, Progress: 1, Mode: modes[d.Name]}
		switch d.State {
		case replication.StateInitial:
			wd.Progress = float64(d.Cursor) / float64(max(d.Size, 1))
			if v.State != replication.StateResync {
				v.State = replication.StateInitial
			}
		case replication.StateResync:
			v.State, v.Reason = replication.StateResync, d.Reason
		}
		if row, err := s.db.Resync(ctx, m.ID, d.Index); err == nil {
			wd.Resync = &api.Resync{State: row.State, Reason: row.Reason, Manual: row.Manual,
				Scheduled: s.resyncScheduled(ctx, m, row), Attempts: row.Attempts, LastError: row.LastError,
				Total: row.Total, Compared: row.Compared, Sent: row.Sent}
		} else if !errors.Is(err, store.ErrNotFound) {
			return v, err
		}
		total += d.Size
		copied += int64(wd.Progress * float64(d.Size))
		v.Disks = append(v.Disks, wd)
	}
	if len(m.Disks) == 0 {
		v.State = replication.StateInitial
	}
	if m.Unprotected() {
		v.State, v.Unprotected, v.UnprotectedAt = api.StateUnprotected, true, m.UnprotectedAt
		v.Reason = "replication disabled; the replica and its recovery points are kept on the target"
	}
	v.Progress = 1
	if total > 0 {
		v.Progress = float64(copied) / float64(total)
	}
	points, err := s.db.Points(ctx, m.ID, 1)
	if err != nil {
		return v, err
	}
	if len(points) > 0 {
		p := points[len(points)-1]
		v.LastPoint = &api.Point{ID: replication.PointID(p.Seq), Time: p.Time, Kind: p.Kind}
	}
	if v.PointCount, err = s.db.PointCount(ctx, m.ID); err != nil {
		return v, err
	}
	v.ProcessServer = api.BuiltinProcessServer
	if ps := s.assignedTo(m.ID); ps != "" {
		v.ProcessServer = ps
	}
	if st, ok := s.machineStats(m.ID); ok {
		v.Connected = st.Connected
		v.CacheBytes = st.CacheBytes
		if st.ApplyError != "" && v.Error == "" {
			v.Error = "applying replication data: " + st.ApplyError
		}
		if !st.StatusAt.IsZero() && !m.Unprotected() {
			v.RPO, v.RPOKnown = rpo(st.LastStatus, st.StatusAt, time.Now()), true
		}
	}
	return v, nil
}

// rpo is the current data-loss window: how far back the newest change that
// the process server is known to hold durably lies. With changes pending on
// the agent, it is the age of the oldest one; with none, everything up to the
// agent's last report is held, so it is the age of that report. Ages are
// measured on the agent's clock and extended by the server time since the
// report, so clock skew between the two does not matter.
func rpo(st replication.Status, at, now time.Time) time.Duration {
	since := now.Sub(at)
	if st.OldestPending > 0 {
		return time.Duration(st.Time-st.OldestPending) + since
	}
	return since
}

// ProcessServer returns the process server's figures for the API and console.
func (s *Server) ProcessServer() api.ProcessServer {
	h := s.host.Last()
	return api.NewProcessServer(s.ps.Figures(), h.CPU, h.Memory, h.MemoryTotal, h.Err, s.target.String())
}

// hostLoop samples the host's CPU and memory every 5 s (the process
// server's health figures).
func (s *Server) hostLoop() {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	s.host.Sample(time.Now())
	for {
		select {
		case <-s.ctx.Done():
			return
		case now := <-t.C:
			s.host.Sample(now)
		}
	}
}
