package server

import (
	"context"
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

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// apiError is an error with the HTTP status it maps to.
type apiError struct {
	status int
	msg    string
	// confirm: what the operator is asked to confirm (api.ErrorBody's
	// Thumbprint and HostKey), if anything.
	thumbprint, hostKey string
}

func (e *apiError) Error() string { return e.msg }

func errorf(status int, format string, args ...any) error {
	return &apiError{status: status, msg: fmt.Sprintf(format, args...)}
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
	body := api.ErrorBody{Error: err.Error()}
	if ae != nil {
		body.Thumbprint, body.HostKey = ae.thumbprint, ae.hostKey
	}
	writeJSON(w, status, body)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func readJSON(r *http.Request, v any) error {
	return readJSONMax(r, v, 1<<20)
}

// readJSONMax is readJSON for a body of at most max bytes.
func readJSONMax(r *http.Request, v any, max int64) error {
	dec := json.NewDecoder(io.LimitReader(r.Body, max))
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
		// Scale-out process servers: registration by the passphrase
		// proof, then heartbeats by their client certificate.
		r.Post("/process-servers/register", handle(s.handlePSRegister))
		r.Post("/process-servers/heartbeat", handle(s.handlePSHeartbeat))
		r.Post("/process-servers/images/{id}", handle(s.handlePSImage)) // api.PSImagePath
		r.Post("/process-servers/cuts/{cut}", handle(s.handlePSCut))
		// An agent asks where its process server is (client certificate).
		r.Get("/agents/data-address", handle(s.handleDataAddress))
		// Operator API: admin token.
		r.Group(func(r chi.Router) {
			r.Use(s.requireToken)
			r.Get("/machines", handle(s.handleMachines))
			r.Get("/machines/{machine}", handle(s.handleMachine))
			r.Get("/machines/{machine}/points", handle(s.handlePoints))
			r.Post("/machines/{machine}/points", handle(s.handleTag))
			r.Get("/machines/{machine}/points/{point}", handle(s.handlePoint))
			r.Get("/machines/{machine}/points/{point}/disks/{disk}/image", handle(s.handleImage))
			r.Post("/machines/{machine}/policy", handle(s.handleAssignPolicy))
			r.Get("/machines/{machine}/timeplan", handle(s.handleTimePlan))
			r.Get("/machines/{machine}/history", handle(s.handleHistory))
			r.Get("/machines/{machine}/segments/{segment}", handle(s.handleSegment))
			r.Get("/policies", handle(s.handlePolicies))
			r.Post("/policies", handle(s.handleCreatePolicy))
			r.Get("/policies/{policy}", handle(s.handlePolicy))
			r.Patch("/policies/{policy}", handle(s.handleUpdatePolicy))
			r.Get("/events", handle(s.handleEvents))
			r.Get("/alerts", handle(s.handleAlerts))
			r.Post("/alerts/test", handle(s.handleTestNotification))
			r.Post("/alerts/{alert}/ack", handle(s.handleAckAlert))
			r.Get("/settings/notifications", handle(s.handleNotifications))
			r.Put("/settings/notifications/email", handle(s.handleSetEmail))
			r.Delete("/settings/notifications/email", handle(s.handleSetEmail))
			r.Put("/settings/notifications/webhook", handle(s.handleSetWebhook))
			r.Delete("/settings/notifications/webhook", handle(s.handleSetWebhook))
			r.Get("/process-servers", handle(s.handlePSList))
			r.Delete("/process-servers/{name}", handle(s.handlePSRemove))
			r.Post("/machines/{machine}/process-server", handle(s.handleSwitch))
			r.Post("/process-servers/{name}/switch", handle(s.handleSwitchAll))
			r.Get("/process-server", func(w http.ResponseWriter, r *http.Request) {
				writeJSON(w, http.StatusOK, s.ProcessServer())
			})
			r.Post("/machines/{machine}/group", handle(s.handleSetGroup))
			r.Post("/machines/{machine}/resync", handle(s.handleResync))
			r.Post("/machines/{machine}/unprotect", handle(s.handleUnprotect))
			r.Get("/machines/{machine}/resync", handle(s.handleResyncs))
			r.Put("/settings/resync-window", handle(s.handleResyncWindow))
			r.Post("/machines/{machine}/verify", handle(s.handleVerify))
			r.Get("/machines/{machine}/verify", handle(s.handleVerifyStatus))
			r.Put("/settings/scrub", handle(s.handleScrubSetting))
			r.Get("/vcenters", handle(s.handleVCenters))
			r.Post("/vcenters", handle(s.handleAddVCenter))
			r.Delete("/vcenters/{vcenter}", handle(s.handleRemoveVCenter))
			r.Get("/vms", handle(s.handleVMs))
			r.Post("/protect", handle(s.handleProtect))
			r.Post("/vms/unprotect", handle(s.handleUnprotectVM))
			r.Get("/jobs", handle(s.handleJobs))
			r.Get("/jobs/{job}", handle(s.handleJob))
			r.Post("/jobs/{job}/confirm", handle(s.handleConfirmJob))
			r.Post("/jobs/{job}/cancel", handle(s.handleCancelJob))
			r.Get("/failovers", handle(s.handleFailovers))
			r.Post("/failovers", handle(s.handleStartFailover))
			r.Post("/failovers/{action}", handle(s.handleFailoverAction))
			r.Post("/machines/{machine}/reprotect", handle(s.handleReprotect))
			r.Post("/machines/{machine}/failback", handle(s.handleFailback))
			r.Get("/plans", handle(s.handlePlans))
			r.Post("/plans", handle(s.handleCreatePlan))
			r.Get("/plans/{plan}", handle(s.handlePlan))
			r.Put("/plans/{plan}", handle(s.handleCreatePlan))
			r.Delete("/plans/{plan}", handle(s.handleDeletePlan))
			r.Post("/plans/{plan}/reprotect", handle(s.handleReprotectPlan))
			r.Post("/plans/{plan}/failback", handle(s.handleFailbackPlan))
			r.Post("/groups/{group}/reprotect", handle(s.handleReprotectGroup))
			r.Post("/groups/{group}/failback", handle(s.handleFailbackGroup))
			r.Get("/groups/{group}/points", handle(s.handleGroupPoints))
			r.Post("/groups/{group}/points", handle(s.handleGroupTag))
			r.Get("/metrics/token", handle(s.handleMetricsToken))
			r.Post("/metrics/token", handle(s.handleMetricsToken))
		})
	})
	// Prometheus: the admin token or the read-only metrics token.
	r.With(s.requireMetricsToken).Get("/metrics", s.metrics.handler.ServeHTTP)
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

func (s *Server) handleChallenge(w http.ResponseWriter, r *http.Request) error {
	nonce := s.nonces.issue(nonceSource(r.RemoteAddr))
	_, port, _ := net.SplitHostPort(s.dataL.Addr().String())
	p, _ := strconv.Atoi(port)
	writeJSON(w, http.StatusOK, enroll.Challenge{Nonce: nonce, CAPEM: string(s.ca.CertPEM),
		Proof: enroll.ServerProof(s.regKey, nonce, s.ca.CertPEM), DataPort: p,
		Salt: s.regSalt, KDF: replication.VaultKDF})
	return nil
}

func (s *Server) handleRegister(w http.ResponseWriter, r *http.Request) error {
	var req enroll.RegisterRequest
	if err := readJSON(r, &req); err != nil {
		return err
	}
	if !s.nonces.take(req.Nonce) { // single use
		// 409, not 400: the request was good but its challenge is gone
		// (used, expired, or evicted by others' challenges); the agent
		// retries with a new one.
		return errorf(http.StatusConflict, "unknown, used or expired registration challenge; try again")
	}
	if !enroll.CheckProof(req.Proof, enroll.AgentProof(s.regKey, req.Nonce, req.Name, []byte(req.CSRPEM))) {
		s.log.Warn("registration refused: wrong passphrase", "name", req.Name, "remote", r.RemoteAddr)
		time.Sleep(500 * time.Millisecond)
		return errorf(http.StatusForbidden, "wrong vault passphrase: nothing was registered")
	}
	if !replication.ValidMachineName(req.Name) {
		return errorf(http.StatusBadRequest, "machine name %q: want %s; nothing was registered", req.Name, replication.MachineNameRule)
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
	if errors.Is(err, store.ErrUnprotected) {
		// Not 409, which agents retry: an operator must choose. The
		// unprotected machine keeps its name (and its recovery points)
		// until its replica is deleted.
		s.log.Warn("registration refused: the name belongs to an unprotected machine", "name", req.Name, "remote", r.RemoteAddr)
		return errorf(http.StatusUnprocessableEntity, "%v; its replica is kept for recovery under this name: to protect the machine again, run asr unprotect --machine %s --delete-replica (deletes that replica and its recovery points) or register this agent under another name; nothing was registered", err, req.Name)
	}
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
	if created {
		s.placeNew(r.Context(), m)
	}
	s.log.Info("agent registered", "machine", m.ID, "name", m.Name, "remote", r.RemoteAddr)
	_, port, _ := net.SplitHostPort(s.dataL.Addr().String())
	p, _ := strconv.Atoi(port)
	writeJSON(w, http.StatusOK, enroll.RegisterResponse{MachineID: m.ID, CertPEM: string(certPEM), DataPort: p})
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
	v, err := s.machineView(r.Context(), m, nil)
	if err != nil {
		return err
	}
	v.Direction = s.directionOf(r.Context(), m.ID)
	v.Reverse = s.reverseStatus(r.Context(), m)
	v.ReverseSource = s.reverseSource(r.Context(), m.ID)
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
	out := make([]api.PointJSON, len(ps))
	for i, p := range ps {
		out[i] = api.PointOf(p)
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// handlePoint answers one point, read whole from the catalog (the listing
// reads only the objects' names): its cut among others.
func (s *Server) handlePoint(w http.ResponseWriter, r *http.Request) error {
	m, err := s.findMachine(r.Context(), r)
	if err != nil {
		return err
	}
	p, err := s.cat.FindPoint(r.Context(), m.ID, chi.URLParam(r, "point"))
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.PointOf(p))
	return nil
}

func (s *Server) handleTag(w http.ResponseWriter, r *http.Request) error {
	m, err := s.findMachine(r.Context(), r)
	if err != nil {
		return err
	}
	if err := refuseUnprotected(m, "a recovery point"); err != nil {
		return err
	}
	var req api.TagRequest
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
		if st, ok := s.machineStats(m.ID); !ok || !st.Connected {
			return fmt.Errorf("machine %s: %w", m.Name, procserver.ErrNotConnected)
		}
		if !s.goRequest(func() {
			ctx, cancel := context.WithTimeout(s.ctx, timeout)
			defer cancel()
			if _, err := s.requestPoint(ctx, m.ID, req.App); err != nil {
				s.log.Warn("requested point failed", "machine", m.ID, "err", err)
			}
		}) {
			return errorf(http.StatusServiceUnavailable, "the server is stopping")
		}
		writeJSON(w, http.StatusAccepted, map[string]string{"status": "requested"})
		return nil
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	p, err := s.tag(ctx, m, req.App)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, api.PointOf(p))
	return nil
}

// tag asks a machine's agent for a recovery point now and waits for it
// (the API's and the console's tag): what the process server refuses is
// a conflict; an agent not connected or a deadline passed keep their
// errors.
func (s *Server) tag(ctx context.Context, m store.Machine, app bool) (replication.Point, error) {
	if err := refuseUnprotected(m, "a recovery point"); err != nil {
		return replication.Point{}, err
	}
	p, err := s.requestPoint(ctx, m.ID, app)
	if err != nil {
		if errors.Is(err, procserver.ErrRemoved) {
			return p, errorf(http.StatusConflict, "%v", err)
		}
		if errors.Is(err, procserver.ErrNotConnected) || errors.Is(err, context.DeadlineExceeded) {
			return p, err
		}
		return p, errorf(http.StatusConflict, "%v", err)
	}
	// The point is made (on the target); the machine's view shows it once
	// the database has its copy, which is worth a short wait, not more.
	sctx, scancel := context.WithTimeout(ctx, 5*time.Second)
	s.mirror.sync(sctx)
	scancel()
	return p, nil
}

// handleImage streams a disk at a point, byte for byte, as
// application/octet-stream, checking every block against the point's
// checksums. The snapshot reader is taken from the running applier, so the
// image is exact while replication goes on (a machine on a scale-out
// process server: from that one's, psImageStream). ?accept_damage=1
// streams damaged blocks as they are and lists them in a trailer.
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
	accept := r.URL.Query().Get("accept_damage") == "1"
	diskName := chi.URLParam(r, "disk")
	if ps := s.assignedTo(m.ID); ps != "" {
		// Its process server reads it (procservers_points.go).
		return s.psImageStream(w, r, m, ps, p, diskName, accept)
	}
	snap, err := s.ps.OpenPoint(ctx, m.ID, p, diskName, accept)
	if err != nil {
		return err
	}
	defer snap.Close()
	size := snap.Size()
	startImage(w, size, snap.Checked(), p.ID)
	_, err = io.CopyBuffer(w, io.NewSectionReader(snap, 0, size), make([]byte, 1<<20))
	var de *replication.DamageError
	if errors.As(err, &de) {
		de.Also = s.ps.DamagedCopies(context.WithoutCancel(ctx), m.ID, diskName, de.Offset, p.ID)
		err = de // its wrappers rendered their text before Also was known
		s.onDamage(m.ID, procserver.Damage{Disk: diskName, Point: p.ID, Blocks: []int64{de.Offset}, Found: "a recovery"})
	}
	if err != nil {
		w.Header().Set(api.TrailerImageError, err.Error())
		return nil
	}
	setDamagedTrailer(w, snap.Damaged(), 0)
	return nil
}

// startImage sends an image stream's headers: its size, whether every
// block is checked against the point's checksums, the point, and the
// trailers that follow the stream.
func startImage(w http.ResponseWriter, size int64, checked bool, point string) {
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set(api.HeaderImageSize, strconv.FormatInt(size, 10))
	if checked {
		w.Header().Set(api.HeaderImageChecked, "1")
	}
	w.Header().Set("X-Asr-Point", point)
	w.Header().Set("Trailer", api.TrailerImageError+", "+api.TrailerDamaged+", "+api.TrailerDamagedMore)
	w.WriteHeader(http.StatusOK)
}

// setDamagedTrailer lists, after an image stream, the damaged blocks it
// streamed as they are (at most api.MaxPSImageDamaged), and counts those
// past that, with notListed more known not to be in d.
func setDamagedTrailer(w http.ResponseWriter, d []int64, notListed int64) {
	listed := d[:min(len(d), api.MaxPSImageDamaged)]
	if len(listed) > 0 {
		parts := make([]string, 0, len(listed))
		for _, off := range listed {
			parts = append(parts, strconv.FormatInt(off, 10))
		}
		w.Header().Set(api.TrailerDamaged, strings.Join(parts, ","))
	}
	if more := int64(len(d)-len(listed)) + notListed; more > 0 {
		w.Header().Set(api.TrailerDamagedMore, strconv.FormatInt(more, 10))
	}
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
	out := api.TimePlanJSON{Time: at.UTC().Format(time.RFC3339Nano), Base: plan.Base.ID}
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
