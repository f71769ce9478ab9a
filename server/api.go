package server

import (
	"context"
	"crypto/rand"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/agent"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/pki"
	"github.com/asrdr/asr/store"
)

// PointJSON is a recovery point in API answers and `asr points --json`.
type PointJSON struct {
	ID   string `json:"id"`
	Time string `json:"time"` // RFC 3339, UTC
	Kind string `json:"kind"`
}

func pointJSON(p replication.Point) PointJSON {
	return PointJSON{ID: p.ID, Time: p.Time.UTC().Format(time.RFC3339Nano), Kind: p.Kind}
}

// apiError is an error with the HTTP status it maps to.
type apiError struct {
	status int
	msg    string
}

func (e *apiError) Error() string { return e.msg }

func errorf(status int, format string, args ...any) error {
	return &apiError{status, fmt.Sprintf(format, args...)}
}

// writeError maps an error to a status at the HTTP boundary.
func writeError(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	var ae *apiError
	switch {
	case errors.As(err, &ae):
		status = ae.status
	case errors.Is(err, store.ErrNotFound), errors.Is(err, replication.ErrNotFound), errors.Is(err, replication.ErrNoPoint):
		status = http.StatusNotFound
	case errors.Is(err, procserver.ErrNotConnected):
		status = http.StatusServiceUnavailable
	case errors.Is(err, context.DeadlineExceeded):
		status = http.StatusGatewayTimeout
	}
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func readJSON(r *http.Request, v any) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return errorf(http.StatusBadRequest, "request body: %v", err)
	}
	return nil
}

// handle adapts an error-returning handler.
func handle(fn func(w http.ResponseWriter, r *http.Request) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if err := fn(w, r); err != nil {
			writeError(w, err)
		}
	}
}

func (s *Server) routes() http.Handler {
	r := chi.NewRouter()
	r.Route("/api/v1", func(r chi.Router) {
		r.Get("/version", func(w http.ResponseWriter, r *http.Request) {
			writeJSON(w, http.StatusOK, map[string]string{"version": Version})
		})
		// Agent enrolment: authenticated by the passphrase proof.
		r.Get("/agents/challenge", handle(s.handleChallenge))
		r.Post("/agents/register", handle(s.handleRegister))
		// Operator API: admin token.
		r.Group(func(r chi.Router) {
			r.Use(s.requireToken)
			r.Get("/machines", handle(s.handleMachines))
			r.Get("/machines/{machine}", handle(s.handleMachine))
			r.Get("/machines/{machine}/points", handle(s.handlePoints))
			r.Post("/machines/{machine}/points", handle(s.handleTag))
			r.Get("/machines/{machine}/points/{point}/disks/{disk}/image", handle(s.handleImage))
			r.Post("/machines/{machine}/policy", handle(s.handleAssignPolicy))
			r.Get("/machines/{machine}/timeplan", handle(s.handleTimePlan))
			r.Get("/machines/{machine}/segments/{segment}", handle(s.handleSegment))
			r.Get("/policies", handle(s.handlePolicies))
			r.Post("/policies", handle(s.handleCreatePolicy))
			r.Get("/policies/{policy}", handle(s.handlePolicy))
			r.Patch("/policies/{policy}", handle(s.handleUpdatePolicy))
			r.Get("/events", handle(s.handleEvents))
			r.Get("/process-server", func(w http.ResponseWriter, r *http.Request) {
				writeJSON(w, http.StatusOK, s.ProcessServer())
			})
			r.Post("/machines/{machine}/group", handle(s.handleSetGroup))
			r.Post("/machines/{machine}/resync", handle(s.handleResync))
			r.Get("/machines/{machine}/resync", handle(s.handleResyncs))
			r.Put("/settings/resync-window", handle(s.handleResyncWindow))
			r.Get("/groups/{group}/points", handle(s.handleGroupPoints))
			r.Post("/groups/{group}/points", handle(s.handleGroupTag))
		})
	})
	r.Mount("/", s.console())
	return r
}

// requireToken checks the admin token (Authorization: Bearer TOKEN).
func (s *Server) requireToken(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok || subtle.ConstantTimeCompare([]byte(tok), []byte(s.token)) != 1 {
			time.Sleep(200 * time.Millisecond)
			writeError(w, errorf(http.StatusUnauthorized, "missing or wrong admin token (Authorization: Bearer TOKEN; the token is in %s)", AdminTokenFile))
			return
		}
		next.ServeHTTP(w, r)
	})
}

const nonceTTL = 5 * time.Minute

func (s *Server) handleChallenge(w http.ResponseWriter, r *http.Request) error {
	nonce := make([]byte, 32)
	rand.Read(nonce)
	s.nonceMu.Lock()
	now := time.Now()
	for k, t := range s.nonces {
		if now.Sub(t) > nonceTTL {
			delete(s.nonces, k)
		}
	}
	if len(s.nonces) > 10000 {
		s.nonceMu.Unlock()
		return errorf(http.StatusTooManyRequests, "too many registrations in progress")
	}
	s.nonces[string(nonce)] = now
	s.nonceMu.Unlock()
	_, port, _ := net.SplitHostPort(s.dataL.Addr().String())
	p, _ := strconv.Atoi(port)
	writeJSON(w, http.StatusOK, agent.Challenge{Nonce: nonce, CAPEM: string(s.ca.CertPEM),
		Proof: pki.ServerProof(s.pass, nonce, s.ca.CertPEM), DataPort: p})
	return nil
}

func (s *Server) handleRegister(w http.ResponseWriter, r *http.Request) error {
	var req agent.RegisterRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	s.nonceMu.Lock()
	issued, ok := s.nonces[string(req.Nonce)]
	delete(s.nonces, string(req.Nonce)) // single use
	s.nonceMu.Unlock()
	if !ok || time.Since(issued) > nonceTTL {
		return errorf(http.StatusBadRequest, "unknown or expired registration challenge; try again")
	}
	if !pki.CheckProof(req.Proof, pki.AgentProof(s.pass, req.Nonce, req.Name, []byte(req.CSRPEM))) {
		s.log.Warn("registration refused: wrong passphrase", "name", req.Name, "remote", r.RemoteAddr)
		time.Sleep(500 * time.Millisecond)
		return errorf(http.StatusForbidden, "wrong vault passphrase: nothing was registered")
	}
	if req.Name == "" || len(req.Name) > 64 {
		return errorf(http.StatusBadRequest, "machine name must be 1 to 64 characters")
	}
	id := newMachineID()
	if existing, err := s.db.MachineByName(r.Context(), req.Name); err == nil {
		id = existing.ID
	}
	certPEM, serial, err := s.ca.SignClient([]byte(req.CSRPEM), id)
	if err != nil {
		return errorf(http.StatusBadRequest, "%v", err)
	}
	m, created, err := s.db.CreateMachine(r.Context(), id, req.Name, serial)
	if err != nil {
		return err
	}
	if !created {
		// A re-registered machine (new state directory) starts a new log:
		// the server's copy can no longer be proven to match the source.
		// The old agent stops here: its connection is closed (its
		// certificate no longer connects) and its log is over, so the new
		// agent's log is never joined to it by sequence number.
		s.log.Warn("machine re-registered; its earlier certificate is revoked", "machine", m.ID, "name", m.Name)
		if err := s.ps.Supersede(r.Context(), m.ID, "the machine was re-registered"); err != nil {
			return err
		}
	}
	s.log.Info("agent registered", "machine", m.ID, "name", m.Name, "remote", r.RemoteAddr)
	_, port, _ := net.SplitHostPort(s.dataL.Addr().String())
	p, _ := strconv.Atoi(port)
	writeJSON(w, http.StatusOK, agent.RegisterResponse{MachineID: m.ID, CertPEM: string(certPEM), DataPort: p})
	return nil
}

func (s *Server) findMachine(ctx context.Context, r *http.Request) (store.Machine, error) {
	name := chi.URLParam(r, "machine")
	m, err := s.db.MachineByName(ctx, name)
	if errors.Is(err, store.ErrNotFound) {
		return m, errorf(http.StatusNotFound, "no machine named %q", name)
	}
	return m, err
}

func (s *Server) handleMachines(w http.ResponseWriter, r *http.Request) error {
	ms, err := s.Machines(r.Context())
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, ms)
	return nil
}

func (s *Server) handleMachine(w http.ResponseWriter, r *http.Request) error {
	m, err := s.findMachine(r.Context(), r)
	if err != nil {
		return err
	}
	v, err := s.machineView(r.Context(), m)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, v)
	return nil
}

func (s *Server) handlePoints(w http.ResponseWriter, r *http.Request) error {
	m, err := s.findMachine(r.Context(), r)
	if err != nil {
		return err
	}
	ps, err := s.cat.Points(r.Context(), m.ID)
	if err != nil {
		return err
	}
	out := make([]PointJSON, len(ps))
	for i, p := range ps {
		out[i] = pointJSON(p)
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// TagRequest is the body of POST /api/v1/machines/{m}/points.
type TagRequest struct {
	App     bool   `json:"app,omitempty"`
	Timeout string `json:"timeout,omitempty"` // Go duration, default 2m
	// NoWait returns 202 as soon as the request is handed to the agent.
	NoWait bool `json:"no_wait,omitempty"`
}

func (s *Server) handleTag(w http.ResponseWriter, r *http.Request) error {
	m, err := s.findMachine(r.Context(), r)
	if err != nil {
		return err
	}
	var req TagRequest
	if r.ContentLength != 0 {
		if err := readJSON(r, &req); err != nil {
			return err
		}
	}
	timeout := 2 * time.Minute
	if req.Timeout != "" {
		if timeout, err = time.ParseDuration(req.Timeout); err != nil || timeout <= 0 {
			return errorf(http.StatusBadRequest, "timeout %q: want a positive Go duration", req.Timeout)
		}
	}
	if req.NoWait {
		if st, ok := s.ps.Stats(m.ID); !ok || !st.Connected {
			return fmt.Errorf("machine %s: %w", m.Name, procserver.ErrNotConnected)
		}
		go func() {
			ctx, cancel := context.WithTimeout(s.ctx, timeout)
			defer cancel()
			if _, err := s.ps.RequestPoint(ctx, m.ID, req.App); err != nil {
				s.log.Warn("requested point failed", "machine", m.ID, "err", err)
			}
		}()
		writeJSON(w, http.StatusAccepted, map[string]string{"status": "requested"})
		return nil
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	p, err := s.ps.RequestPoint(ctx, m.ID, req.App)
	if err != nil {
		if errors.Is(err, procserver.ErrNotConnected) || errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		return errorf(http.StatusConflict, "%v", err)
	}
	writeJSON(w, http.StatusOK, pointJSON(p))
	return nil
}

// handleImage streams a disk at a point, byte for byte, as
// application/octet-stream. The snapshot reader is taken from the running
// applier, so the image is exact while replication goes on.
func (s *Server) handleImage(w http.ResponseWriter, r *http.Request) error {
	ctx := r.Context()
	m, err := s.findMachine(ctx, r)
	if err != nil {
		return err
	}
	p, err := s.cat.FindPoint(ctx, m.ID, chi.URLParam(r, "point"))
	if err != nil {
		return err
	}
	diskName := chi.URLParam(r, "disk")
	var snap replication.SnapshotReader
	var size int64
	err = s.ps.WithApplier(ctx, m.ID, func(a *replication.Applier) error {
		mc := a.Machine()
		for _, d := range mc.Disks {
			if d.Name != diskName {
				continue
			}
			rd, ok := a.Disk(d.Index)
			if !ok {
				return fmt.Errorf("disk %s is not open", diskName)
			}
			var err error
			snap, err = rd.OpenSnapshot(ctx, replication.SnapshotName(p.Seq))
			if err == nil {
				size = snap.Size()
				if s, ok := p.Sizes[d.Index]; ok && s <= size {
					size = s // the disk grew after the point
				}
			}
			return err
		}
		return errorf(http.StatusNotFound, "machine %s has no disk %q", m.Name, diskName)
	})
	if err != nil {
		return err
	}
	defer snap.Close()
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	w.Header().Set("X-Asr-Point", p.ID)
	w.WriteHeader(http.StatusOK)
	// Errors after the header are reported by a short body, which the
	// client detects against Content-Length.
	io.CopyBuffer(w, io.NewSectionReader(snap, 0, size), make([]byte, 1<<20))
	return nil
}

// TimePlanJSON is the answer of GET /api/v1/machines/{m}/timeplan?time=T:
// the point to start from and the kept segments to replay.
type TimePlanJSON struct {
	Time     string   `json:"time"`
	Base     string   `json:"base"` // point id
	Segments []string `json:"segments"`
}

func (s *Server) handleTimePlan(w http.ResponseWriter, r *http.Request) error {
	m, err := s.findMachine(r.Context(), r)
	if err != nil {
		return err
	}
	at, err := time.Parse(time.RFC3339Nano, r.URL.Query().Get("time"))
	if err != nil {
		return errorf(http.StatusBadRequest, "time %q: want RFC 3339, e.g. 2026-11-26T09:30:00Z", r.URL.Query().Get("time"))
	}
	plan, err := s.cat.PlanTime(r.Context(), m.ID, at)
	if errors.Is(err, replication.ErrTimeOutOfRange) {
		return errorf(http.StatusUnprocessableEntity, "%v", err)
	}
	if err != nil {
		return err
	}
	out := TimePlanJSON{Time: at.UTC().Format(time.RFC3339Nano), Base: plan.Base.ID}
	for _, si := range plan.Segments {
		out.Segments = append(out.Segments, path.Base(si.Key))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// handleSegment streams a kept segment (for any-point-in-time recovery
// through the server).
func (s *Server) handleSegment(w http.ResponseWriter, r *http.Request) error {
	ctx := r.Context()
	m, err := s.findMachine(ctx, r)
	if err != nil {
		return err
	}
	name := chi.URLParam(r, "segment")
	segs, err := s.cat.Segments(ctx, m.ID)
	if err != nil {
		return err
	}
	for _, si := range segs {
		if path.Base(si.Key) == name {
			data, err := s.cat.Segment(ctx, si)
			if err != nil {
				return err
			}
			w.Header().Set("Content-Type", "application/octet-stream")
			w.Header().Set("Content-Length", strconv.Itoa(len(data)))
			w.Write(data)
			return nil
		}
	}
	return errorf(http.StatusNotFound, "machine %s keeps no segment %q", m.Name, name)
}
