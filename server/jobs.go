package server

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"sync"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// A job is a long operation an operator started (a push install, the
// removal of an agent): it runs on the server's context, its steps are
// kept in memory for watchers and written to the database, so the console
// and `asr jobs` show them after it ends too. A server that stops with jobs
// running marks them failed at its next start.
type job struct {
	s   *Server
	id  string
	log func(msg string, args ...any)

	mu      sync.Mutex
	j       api.Job
	changed chan struct{} // closed and replaced at each change
	written time.Time     // last write of byte progress to the database

	cancel    context.CancelFunc
	cancelled bool          // under mu: an operator cancelled it
	confirm   chan struct{} // under mu: closed when a waiting action is confirmed
}

// jobsState is the server's running jobs.
type jobsState struct {
	mu      sync.Mutex
	running map[string]*job
}

// startJob records a job and runs fn on its own goroutine. fn reports
// through the job's step methods; its error fails the job.
func (s *Server) startJob(ctx context.Context, kind, subject string, fn func(ctx context.Context, j *job) error) (api.Job, error) {
	b := make([]byte, 8)
	rand.Read(b)
	j := &job{s: s, id: hex.EncodeToString(b), changed: make(chan struct{})}
	j.j = api.Job{ID: j.id, Kind: kind, Subject: subject, State: api.JobRunning, Steps: []api.JobStep{}, StartedAt: s.now()}
	j.log = func(msg string, args ...any) {
		s.log.Info(msg, append([]any{"job", j.id, "kind", kind, "subject", subject}, args...)...)
	}
	if err := s.db.AddJob(ctx, store.Job{ID: j.id, Kind: kind, Subject: subject, StartedAt: j.j.StartedAt}); err != nil {
		return api.Job{}, err
	}
	return s.runJob(j, fn), nil
}

// resumeJob runs fn as job rec again, a job a stopped server left (its
// steps and output as recorded, its state running again): a failback
// past its switch goes on after a restart in the job that started it.
func (s *Server) resumeJob(ctx context.Context, rec store.Job, fn func(ctx context.Context, j *job) error) (api.Job, error) {
	if err := s.db.ResumeJob(ctx, rec.ID); err != nil {
		return api.Job{}, err
	}
	j := &job{s: s, id: rec.ID, changed: make(chan struct{})}
	j.j = jobFromRow(rec)
	j.j.State, j.j.Error, j.j.EndedAt, j.j.Waiting = api.JobRunning, "", time.Time{}, ""
	j.log = func(msg string, args ...any) {
		s.log.Info(msg, append([]any{"job", j.id, "kind", rec.Kind, "subject", rec.Subject}, args...)...)
	}
	return s.runJob(j, fn), nil
}

// runJob runs a recorded job's fn on its own goroutine.
func (s *Server) runJob(j *job, fn func(ctx context.Context, j *job) error) api.Job {
	s.jobs.mu.Lock()
	if s.jobs.running == nil {
		s.jobs.running = map[string]*job{}
	}
	s.jobs.running[j.id] = j
	s.jobs.mu.Unlock()
	j.log("job started")
	jctx, cancel := context.WithCancel(s.ctx)
	j.cancel = cancel
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer cancel()
		err := fn(jctx, j)
		j.finish(err)
		s.jobs.mu.Lock()
		delete(s.jobs.running, j.id)
		s.jobs.mu.Unlock()
	}()
	return j.snapshot()
}

func (j *job) snapshot() api.Job {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.cloneLocked()
}

// cloneLocked copies the job's state (j.mu held), its slices too: the copy
// is read (marshalled, saved) after the lock is released, while other
// steps change the job.
func (j *job) cloneLocked() api.Job {
	c := j.j
	c.Steps = append([]api.JobStep(nil), j.j.Steps...)
	c.Output = append([]string(nil), j.j.Output...)
	c.Machines = append([]string(nil), j.j.Machines...)
	return c
}

// update sets the step named st.Name (appending it the first time) and
// publishes the change; byte progress alone is written to the database at
// most every half second.
func (j *job) update(st api.JobStep) {
	j.mu.Lock()
	found := false
	progressOnly := false
	for i := range j.j.Steps {
		if j.j.Steps[i].Name == st.Name {
			old := j.j.Steps[i]
			progressOnly = old.State == st.State && old.Detail == st.Detail && old.Total == st.Total
			j.j.Steps[i] = st
			found = true
		}
	}
	if !found {
		j.j.Steps = append(j.j.Steps, st)
	}
	write := !progressOnly || time.Since(j.written) > 500*time.Millisecond
	if write {
		j.written = time.Now()
	}
	j.publishLocked()
	c := j.cloneLocked()
	j.mu.Unlock()
	if !progressOnly {
		j.log("job step", "step", st.Name, "state", st.State, "detail", st.Detail)
	}
	if write {
		j.save(c)
	}
}

// step starts a step and returns the function that ends it: done with
// what it found (done: "" keeps the running detail), or failed with the
// error's text.
func (j *job) step(name, detail string) func(done string, err error) {
	j.update(api.JobStep{Name: name, State: "running", Detail: detail})
	return func(done string, err error) {
		switch {
		case err != nil:
			j.update(api.JobStep{Name: name, State: "failed", Detail: err.Error()})
		case done != "":
			j.update(api.JobStep{Name: name, State: "done", Detail: done})
		default:
			j.update(api.JobStep{Name: name, State: "done", Detail: detail})
		}
	}
}

func (j *job) publishLocked() {
	close(j.changed)
	j.changed = make(chan struct{})
}

func (j *job) finish(err error) {
	j.mu.Lock()
	j.j.State, j.j.EndedAt = api.JobSucceeded, j.s.now()
	j.j.Waiting, j.j.Cancellable = "", false
	if err != nil {
		j.j.State, j.j.Error = api.JobFailed, err.Error()
		if j.cancelled {
			j.j.State = api.JobCancelled
		}
		for i := range j.j.Steps {
			if j.j.Steps[i].State == "running" {
				j.j.Steps[i].State = "failed"
			}
		}
	}
	j.s.metrics.observeJob(j.j) // before anyone can see that it ended
	j.publishLocked()
	c := j.cloneLocked()
	j.mu.Unlock()
	j.save(c)
	if err != nil {
		j.log("job failed", "err", err)
	} else {
		j.log("job succeeded")
	}
}

func (j *job) save(c api.Job) {
	steps, _ := json.Marshal(c.Steps)
	// The server's context may be ending: the job's last word still goes
	// to the database.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := j.s.db.UpdateJob(ctx, c.ID, c.State, string(steps), c.Error); err != nil {
		j.s.log.Warn("record a job's progress", "job", c.ID, "err", err)
	}
	out, _ := json.Marshal(c.Output)
	if err := j.s.db.SetJobResult(ctx, c.ID, string(out), time.Duration(c.RTO*float64(time.Second)), c.Waiting); err != nil {
		j.s.log.Warn("record a job's result", "job", c.ID, "err", err)
	}
}

// setResult sets the job's output lines and measured RTO.
func (j *job) setResult(lines []string, rto time.Duration) {
	j.mu.Lock()
	j.j.Output = append([]string(nil), lines...)
	j.j.RTO = rto.Seconds()
	j.publishLocked()
	c := j.cloneLocked()
	j.mu.Unlock()
	j.save(c)
}

// setMachines notes the machines a plan's job acts on (api.Job.Machines).
func (j *job) setMachines(names []string) {
	j.mu.Lock()
	j.j.Machines = append([]string(nil), names...)
	j.publishLocked()
	j.mu.Unlock()
}

// setCancellable says whether an operator may cancel the job now (it is
// safe to stop until the switch of a failover).
func (j *job) setCancellable(ok bool) {
	j.mu.Lock()
	j.j.Cancellable = ok
	j.publishLocked()
	j.mu.Unlock()
}

// waitConfirm pauses the job on a manual action until an operator
// confirms it (ConfirmJob) or the job is cancelled.
func (j *job) waitConfirm(ctx context.Context, text string) error {
	j.mu.Lock()
	ch := make(chan struct{})
	j.confirm = ch
	j.j.Waiting = text
	j.j.Cancellable = true
	j.publishLocked()
	c := j.cloneLocked()
	j.mu.Unlock()
	j.save(c)
	j.log("job waits for a manual action", "action", text)
	defer func() {
		j.mu.Lock()
		j.confirm, j.j.Waiting, j.j.Cancellable = nil, "", false
		j.publishLocked()
		c := j.cloneLocked()
		j.mu.Unlock()
		j.save(c)
	}()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// ConfirmJob confirms the manual action a job waits on.
func (s *Server) ConfirmJob(ctx context.Context, id string) error {
	s.jobs.mu.Lock()
	j := s.jobs.running[id]
	s.jobs.mu.Unlock()
	if j == nil {
		if _, err := s.db.Job(ctx, id); err != nil {
			return err
		}
		return errorf(http.StatusConflict, "job %s is not running", id)
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.confirm == nil {
		return errorf(http.StatusConflict, "job %s is not waiting for a confirmation", id)
	}
	close(j.confirm)
	j.confirm = nil
	j.log("manual action confirmed", "action", j.j.Waiting)
	return nil
}

// CancelJob stops a job that may be stopped now (Cancellable).
func (s *Server) CancelJob(ctx context.Context, id string) error {
	s.jobs.mu.Lock()
	j := s.jobs.running[id]
	s.jobs.mu.Unlock()
	if j == nil {
		if _, err := s.db.Job(ctx, id); err != nil {
			return err
		}
		return errorf(http.StatusConflict, "job %s is not running", id)
	}
	j.mu.Lock()
	if !j.j.Cancellable {
		j.mu.Unlock()
		return errorf(http.StatusConflict, "job %s cannot be cancelled now (it is past the point where stopping is safe)", id)
	}
	j.cancelled = true
	j.mu.Unlock()
	j.log("job cancelled by an operator")
	j.cancel()
	return nil
}

func (s *Server) handleConfirmJob(w http.ResponseWriter, r *http.Request) error {
	return s.jobAction(w, r, s.ConfirmJob)
}

func (s *Server) handleCancelJob(w http.ResponseWriter, r *http.Request) error {
	return s.jobAction(w, r, s.CancelJob)
}

// jobAction acts on the job of the URL and answers with its new state.
func (s *Server) jobAction(w http.ResponseWriter, r *http.Request, act func(context.Context, string) error) error {
	id := chi.URLParam(r, "job")
	if err := act(r.Context(), id); err != nil {
		return err
	}
	j, err := s.Job(r.Context(), id)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, j)
	return nil
}

func jobFromRow(r store.Job) api.Job {
	j := api.Job{ID: r.ID, Kind: r.Kind, Subject: r.Subject, State: r.State, Error: r.Error, StartedAt: r.StartedAt, EndedAt: r.EndedAt,
		RTO: r.RTO.Seconds(), Waiting: r.Waiting}
	json.Unmarshal([]byte(r.Output), &j.Output)
	if json.Unmarshal([]byte(r.Steps), &j.Steps) != nil || j.Steps == nil {
		j.Steps = []api.JobStep{}
	}
	return j
}

// Job returns a job: the running one's live state, or its record.
func (s *Server) Job(ctx context.Context, id string) (api.Job, error) {
	s.jobs.mu.Lock()
	j := s.jobs.running[id]
	s.jobs.mu.Unlock()
	if j != nil {
		return j.snapshot(), nil
	}
	r, err := s.db.Job(ctx, id)
	if err != nil {
		return api.Job{}, err
	}
	return jobFromRow(r), nil
}

// Jobs lists the newest jobs first (running ones with their live state).
func (s *Server) Jobs(ctx context.Context, limit int) ([]api.Job, error) {
	rows, err := s.db.Jobs(ctx, limit)
	if err != nil {
		return nil, err
	}
	out := make([]api.Job, 0, len(rows))
	for _, r := range rows {
		if r.State == store.JobRunning {
			if j, err := s.Job(ctx, r.ID); err == nil {
				out = append(out, j)
				continue
			}
		}
		out = append(out, jobFromRow(r))
	}
	return out, nil
}

// waitJob returns a job once its version differs from version, it ends,
// or a while passes (the long poll behind api.Client.WaitJob).
func (s *Server) waitJob(ctx context.Context, id, version string) (api.Job, error) {
	deadline := time.NewTimer(25 * time.Second)
	defer deadline.Stop()
	for {
		s.jobs.mu.Lock()
		j := s.jobs.running[id]
		s.jobs.mu.Unlock()
		if j == nil {
			return s.Job(ctx, id)
		}
		j.mu.Lock()
		c, ch := j.cloneLocked(), j.changed
		j.mu.Unlock()
		if version == "" || api.JobVersion(c) != version {
			return c, nil
		}
		select {
		case <-ch:
		case <-deadline.C:
			return c, nil
		case <-ctx.Done():
			return c, ctx.Err()
		}
	}
}

func (s *Server) handleJobs(w http.ResponseWriter, r *http.Request) error {
	js, err := s.Jobs(r.Context(), 100)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, js)
	return nil
}

func (s *Server) handleJob(w http.ResponseWriter, r *http.Request) error {
	id := chi.URLParam(r, "job")
	var j api.Job
	var err error
	if v, ok := r.URL.Query()["wait"]; ok {
		j, err = s.waitJob(r.Context(), id, v[0])
	} else {
		j, err = s.Job(r.Context(), id)
	}
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, j)
	return nil
}
