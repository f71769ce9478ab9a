// Package web is asr's web console: a small server-rendered HTML interface
// where DR administrators sign in, see the health of everything on a
// dashboard (counts, alerts, every machine's RPO, 24 h charts drawn as
// SVG on the server), watch the replication state, RPO and recovery points
// of every protected machine and act on one from its page (tag, resync,
// test failover, failover; reprotect and fail back), manage policies and
// replication groups, see the process server, target and vCenters, register vCenters, enable
// replication of their VMs from the inventory, define recovery plans, run
// test failovers, failovers and drills of machines and plans, follow the
// jobs that do it (confirming a plan's manual actions), see and
// acknowledge alerts, set how alerts are sent (e-mail, webhook), and
// manage the console password.
//
// Pages are templ components; live values are refreshed by htmx polling a
// fragment of the page (dashboard, machines, infrastructure, jobs). The only script is the vendored htmx, served
// from the embedded static directory, so the console works without access to
// the internet and under a strict Content-Security-Policy.
//
// The package knows nothing of the rest of asr: the server implements
// [Backend] and mounts the [Handler] returned by [New] at "/".
package web

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/server/api"
)

// Backend is what the console needs from the server.
//
// Secrets and session ids come straight from the browser: implementations
// must compare them in constant time.
type Backend interface {
	// Machines returns every protected machine, in display order.
	Machines(ctx context.Context) ([]api.Machine, error)

	// CheckSecret reports whether s is the admin token or the console
	// password.
	CheckSecret(ctx context.Context, s string) bool
	// HasPassword reports whether a console password has been set.
	HasPassword(ctx context.Context) bool
	// SetPassword sets or replaces the console password. A password the
	// backend refuses yields an error whose message is shown to the user.
	SetPassword(ctx context.Context, pw string) error

	// CreateSession starts a console session and returns its id (the cookie
	// value) and its CSRF token.
	CreateSession(ctx context.Context) (id, csrf string, err error)
	// Session returns the CSRF token of a live session, or an error if the
	// session is unknown or expired.
	Session(ctx context.Context, id string) (csrf string, err error)
	// DeleteSession ends a session. Deleting an unknown session is not an
	// error.
	DeleteSession(ctx context.Context, id string) error

	// StartResync starts a resync of a machine's disk at once, outside the
	// resync window: disk "" is every disk of the machine. An error's message
	// is shown to the user.
	StartResync(ctx context.Context, machineID, disk string) error

	// ProcessServer returns the process server's figures.
	ProcessServer(ctx context.Context) (api.ProcessServer, error)
	// ProcessServers lists the built-in process server and the scale-out
	// ones with their state and figures (asr ps list).
	ProcessServers(ctx context.Context) ([]api.ProcessServerInfo, error)
	// SwitchProcessServer moves a machine to another process server (a
	// name, api.BuiltinProcessServer or api.AutoProcessServer) and
	// returns the one chosen, once the old one has handed it over.
	SwitchProcessServer(ctx context.Context, machine, to string) (string, error)
	// SwitchAll moves every machine of process server from to another,
	// one at a time; it returns the machines moved (also when it stops
	// at one that fails).
	SwitchAll(ctx context.Context, from, to string) ([]string, error)

	// VCenters lists the registered vCenters.
	VCenters(ctx context.Context) ([]api.VCenter, error)
	// AddVCenter registers a vCenter. When the operator must confirm the
	// vCenter's certificate first (no thumbprint in req, or not the one
	// the certificate has), it registers nothing and returns, with the
	// error, the certificate's SHA-256 thumbprint to confirm. Other
	// errors' messages are shown to the user.
	AddVCenter(ctx context.Context, req api.AddVCenterRequest) (v api.VCenter, confirmThumbprint string, err error)
	// RemoveVCenter forgets a vCenter and its inventory: [ErrNotFound] if
	// there is no such vCenter.
	RemoveVCenter(ctx context.Context, name string) error
	// VMs lists the inventory of every vCenter, each VM with the machine
	// protecting it.
	VMs(ctx context.Context) ([]api.VM, error)
	// Policies lists the replication policies by name.
	Policies(ctx context.Context) ([]api.PolicyJSON, error)
	// Protect starts the job that pushes the agent to a VM's guest over
	// SSH and protects its disks. When the guest's SSH host key is not
	// known and not the one req accepts, it starts nothing and returns,
	// with the error, the key's "SHA256:..." fingerprint to confirm.
	// Other errors' messages are shown to the user. req.Key is a secret:
	// implementations must neither store nor log it.
	Protect(ctx context.Context, req api.ProtectRequest) (j api.Job, confirmHostKey string, err error)
	// Jobs lists the newest jobs first, at most limit.
	Jobs(ctx context.Context, limit int) ([]api.Job, error)
	// Job returns a job: [ErrNotFound] if there is no such job.
	Job(ctx context.Context, id string) (api.Job, error)
	// ConfirmJob confirms the manual action a job waits on (its Waiting);
	// CancelJob stops a job that may be stopped now (its Cancellable). An
	// error's message is shown to the user.
	ConfirmJob(ctx context.Context, id string) error
	CancelJob(ctx context.Context, id string) error

	// Points lists a machine's recovery points, oldest first.
	Points(ctx context.Context, machine string) ([]api.PointJSON, error)
	// Failovers lists the live failovers.
	Failovers(ctx context.Context) ([]api.Failover, error)
	// StartFailover starts the job of a test failover, a failover or a
	// drill of a machine or a plan. Cleanup, Commit and ChangePoint start
	// the job that acts on a live one. A request the server refuses
	// starts nothing and returns an error whose message is shown to the
	// user.
	StartFailover(ctx context.Context, req api.FailoverRequest) (api.Job, error)
	Cleanup(ctx context.Context, a api.FailoverAction) (api.Job, error)
	Commit(ctx context.Context, a api.FailoverAction) (api.Job, error)
	ChangePoint(ctx context.Context, a api.FailoverAction) (api.Job, error)
	// Reprotect starts the job that reprotects a machine (by name) in
	// the direction it needs: after a committed planned failover to NBD,
	// its changes go back to the original disks; after a failback,
	// protection resumes forward. Failback starts the job that fails a
	// reprotected machine back. A machine in another state starts
	// nothing and returns an error whose message is shown to the user.
	Reprotect(ctx context.Context, machine string) (api.Job, error)
	Failback(ctx context.Context, machine string) (api.Job, error)
	// FailbackTo starts the job that fails a machine back to a new VM made
	// through a vCenter (req.Alternate), a full copy of its failed-over
	// disks.
	FailbackTo(ctx context.Context, machine string, req api.FailbackRequest) (api.Job, error)
	// ReprotectPlan and FailbackPlan do the same for every machine a
	// recovery plan's failover failed over, as one job; a plan any of
	// whose machines cannot take part starts nothing, and the error
	// lists them.
	ReprotectPlan(ctx context.Context, plan string) (api.Job, error)
	FailbackPlan(ctx context.Context, plan string) (api.Job, error)

	// Plans lists the recovery plans by name.
	Plans(ctx context.Context) ([]api.Plan, error)
	// CreatePlan stores a new plan. A plan the server refuses (a name
	// taken, an unknown machine, a script that is not there) is not
	// stored, and the error's message is shown to the user.
	CreatePlan(ctx context.Context, p api.Plan) (api.Plan, error)
	// DeletePlan deletes a plan: [ErrNotFound] if there is no such plan.
	DeletePlan(ctx context.Context, name string) error

	// Alerts lists the active alerts, most severe and newest first, and
	// with all the resolved ones after them. AckAlert acknowledges one:
	// [ErrNotFound] if there is no such alert.
	Alerts(ctx context.Context, all bool) ([]api.Alert, error)
	AckAlert(ctx context.Context, id int64) error
	// Events lists the newest events first, at most limit.
	Events(ctx context.Context, limit int) ([]api.EventJSON, error)
	// Notifications returns how alerts are sent; SetEmail and SetWebhook
	// change a channel (nil: off; a request refused changes nothing and
	// its error's message is shown); TestNotification sends a test notice
	// through every channel now, its error saying what refused it.
	Notifications(ctx context.Context) (api.NotificationSettings, error)
	SetEmail(ctx context.Context, e *api.EmailSettings) error
	SetWebhook(ctx context.Context, w *api.WebhookSettings) error
	TestNotification(ctx context.Context) (api.TestNotificationResult, error)

	// MachineEvents lists the newest events of a machine (by name),
	// newest first, at most limit: [ErrNotFound] if there is no such
	// machine.
	MachineEvents(ctx context.Context, machine string, limit int) ([]api.EventJSON, error)
	// History returns a machine's RPO and churn samples (one a minute,
	// kept 25 h) since since, oldest first: [ErrNotFound] if there is no
	// such machine.
	History(ctx context.Context, machine string, since time.Time) ([]api.HistorySample, error)
	// Tag asks a machine's agent for a recovery point now (app: an
	// application-consistent one) and returns it once it is made. An
	// error's message is shown to the user.
	Tag(ctx context.Context, machine string, app bool) (api.PointJSON, error)
	// CreatePolicy stores a new policy (fields left empty take the
	// defaults); UpdatePolicy changes the fields set of policy name. A
	// policy the server refuses (a malformed duration, a rule broken, a
	// name taken) changes nothing, and the error's message is shown to
	// the user.
	CreatePolicy(ctx context.Context, p api.PolicyJSON) (api.PolicyJSON, error)
	UpdatePolicy(ctx context.Context, name string, p api.PolicyJSON) (api.PolicyJSON, error)
	// AssignPolicy gives a machine (by name) a policy. An error's message
	// is shown to the user.
	AssignPolicy(ctx context.Context, machine, policy string) error
	// SetGroup puts a machine (by name) in a replication group; ""
	// takes it out. An error's message is shown to the user.
	SetGroup(ctx context.Context, machine, group string) error
	// GroupPoints lists a replication group's points, oldest first;
	// GroupTag makes one now across its members.
	GroupPoints(ctx context.Context, group string) ([]api.GroupPointJSON, error)
	GroupTag(ctx context.Context, group string, app bool) (api.GroupPointJSON, error)
}

// ErrNotFound is what a [Backend] returns for a vCenter, a job or a plan
// that does not exist.
var ErrNotFound = errors.New("not found")

// Options configures a [Handler]. The zero value is usable.
type Options struct {
	// Logger receives request errors; nil discards them.
	Logger *slog.Logger
	// ServerURL is the control URL agents register with, e.g.
	// https://asr.example.com:8443. The console shows it in the agent
	// command line when no machine is protected yet; empty shows a
	// placeholder.
	ServerURL string
	// Now is the clock for relative ages ("3 min ago"); nil is time.Now.
	Now func() time.Time
}

// Handler serves the web console. Create it with [New].
type Handler struct {
	router   http.Handler
	auth     *authHandler
	settings *settingsHandler
}

// New returns the console handler. Mount it at "/"; the console uses no path
// under /api/, which is left to the server's API.
func New(b Backend, opts Options) *Handler {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	now := opts.Now
	if now == nil {
		now = time.Now
	}
	log = log.With("component", "web")

	auth := &authHandler{backend: b, log: log, loginDelay: defaultLoginDelay}
	machines := &machinesHandler{backend: b, log: log, now: now, serverURL: opts.ServerURL}
	settings := &settingsHandler{backend: b, log: log, failDelay: defaultLoginDelay}
	vcenters := &vcentersHandler{backend: b, log: log, now: now}
	inventory := &inventoryHandler{backend: b, log: log, now: now}
	jobs := &jobsHandler{backend: b, log: log, now: now}
	plans := &plansHandler{backend: b, log: log, now: now}
	failovers := &failoversHandler{backend: b, log: log, now: now}
	alerts := &alertsHandler{backend: b, log: log, now: now}
	dashboard := &dashboardHandler{backend: b, log: log, now: now}
	machine := &machineHandler{backend: b, log: log, now: now}
	policies := &policiesHandler{backend: b, log: log, now: now}
	groups := &groupsHandler{backend: b, log: log, now: now}
	pss := &processServersHandler{backend: b, log: log, now: now}
	infra := &infrastructureHandler{backend: b, log: log, now: now}
	failback := &failbackHandler{backend: b, log: log, now: now}

	r := chi.NewRouter()
	r.Use(securityHeaders)
	// Browsers say where a request comes from; refuse cross-origin POSTs
	// outright. Sessions carry a CSRF token on top of this, but the login
	// form has no session yet.
	r.Use(http.NewCrossOriginProtection().Handler)
	r.NotFound(notFoundPage)

	r.Handle("/static/*", http.StripPrefix("/static/", staticHandler()))
	r.Get("/login", auth.loginPage)
	r.Post("/login", auth.login)
	r.Get("/login/link", auth.loginLinkPage)
	r.Post("/login/link", auth.loginLink)
	r.Group(func(r chi.Router) {
		r.Use(auth.requireSession)
		r.Get("/", dashboard.page)
		r.Get("/fragments/dashboard", dashboard.fragment)
		r.Get("/fragments/dashboard/charts", dashboard.charts)
		r.Get("/machines", machines.page)
		r.Get("/machines/{machine}", machine.page)
		r.Get("/fragments/machines/{machine}", machine.fragment)
		r.Get("/policies", policies.page)
		r.Get("/policies/{policy}/edit", policies.editPage)
		r.Get("/groups", groups.page)
		r.Get("/infrastructure", infra.page)
		r.Get("/process-servers", pss.page)
		r.Get("/fragments/infrastructure", infra.fragment)
		r.Get("/fragments/machines", machines.fragment)
		r.Get("/settings", settings.page)
		r.Get("/machines/{machine}/resync", machines.resyncPage)
		r.Get("/machines/{machine}/reprotect", failback.confirmPage(actionReprotect))
		r.Get("/machines/{machine}/failback", failback.confirmPage(actionFailback))
		r.Get("/machines/{machine}/"+actionAlternate, failback.alternatePage)
		r.Get("/vcenters", vcenters.page)
		r.Get("/vcenters/{vcenter}/remove", vcenters.removePage)
		r.Get("/vms", inventory.page)
		r.Get("/protect", inventory.protectPage)
		r.Get("/jobs", jobs.list)
		r.Get("/fragments/jobs", jobs.listFragment)
		r.Get("/jobs/{job}", jobs.page)
		r.Get("/fragments/jobs/{job}", jobs.fragment)
		r.Get("/plans", plans.page)
		r.Get("/plans/{plan}/reprotect", plans.confirm(actionReprotect))
		r.Get("/plans/{plan}/failback", plans.confirm(actionFailback))
		r.Get("/failovers", failovers.page)
		r.Get("/failovers/new", failovers.newPage)
		r.Get("/alerts", alerts.page)
		r.Get("/fragments/alerts", alerts.fragment)
		r.Group(func(r chi.Router) {
			r.Use(requireCSRF)
			r.Post("/logout", auth.logout)
			r.Post("/settings/password", settings.setPassword)
			r.Post("/machines/{machine}/resync", machines.startResync)
			r.Post("/machines/{machine}/reprotect", failback.start(actionReprotect))
			r.Post("/machines/{machine}/failback", failback.start(actionFailback))
			r.Post("/machines/{machine}/"+actionAlternate, failback.alternateStart)
			r.Post("/vcenters", vcenters.add)
			r.Post("/vcenters/{vcenter}/remove", vcenters.remove)
			r.Post("/protect", inventory.protect)
			r.Post("/jobs/{job}/confirm", jobs.confirm)
			r.Post("/jobs/{job}/cancel", jobs.cancel)
			r.Post("/plans", plans.create)
			r.Post("/plans/{plan}/delete", plans.remove)
			r.Post("/plans/{plan}/{action}", plans.act)
			r.Post("/failovers", failovers.start)
			r.Post("/failovers/{action}", failovers.act)
			r.Post("/alerts/{alert}/ack", alerts.ack)
			r.Post("/settings/notifications/{channel}", settings.setNotifications)
			r.Post("/machines/{machine}/tag", machine.tag)
			r.Post("/policies", policies.create)
			r.Post("/policies/assign", policies.assign)
			r.Post("/policies/{policy}/edit", policies.update)
			r.Post("/groups/members", groups.setMember)
			r.Post("/groups/{group}/points", groups.tag)
			r.Post("/process-servers/switch", pss.switchMachine)
			r.Post("/process-servers/{ps}/move", pss.moveAll)
		})
	})
	return &Handler{router: r, auth: auth, settings: settings}
}

// ServeHTTP serves a console request.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h.router.ServeHTTP(w, r)
}

// contentSecurityPolicy allows nothing but the console's own scripts, styles
// and requests: no inline script or style, no framing, forms posting only
// back to the console.
const contentSecurityPolicy = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; " +
	"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"

// securityHeaders sets the headers every response carries. Pages are never
// cached (they show live state behind a login); the static handler overrides
// Cache-Control for its files.
func securityHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", contentSecurityPolicy)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "same-origin")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Cache-Control", "no-store")
		next.ServeHTTP(w, r)
	})
}
