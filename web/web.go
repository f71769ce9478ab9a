// Package web is asr's web console: a small server-rendered HTML interface
// where DR administrators sign in, watch the replication state, RPO and
// recovery points of every protected machine, and manage the console
// password.
//
// Pages are templ components; live values are refreshed by htmx polling a
// fragment of the machines page. The only script is the vendored htmx, served
// from the embedded static directory, so the console works without access to
// the internet and under a strict Content-Security-Policy.
//
// The package knows nothing of the rest of asr: the server implements
// [Backend] and mounts the [Handler] returned by [New] at "/".
package web

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"github.com/go-chi/chi/v5"
)

// Machine is a protected machine as the console shows it. It is also the JSON
// form of a machine in the server's API.
type Machine struct {
	ID           string    `json:"id"`
	Name         string    `json:"name"`
	Connected    bool      `json:"connected"`
	AgentVersion string    `json:"agent_version"`
	LastSeen     time.Time `json:"last_seen,omitzero"` // zero: never seen

	// State summarises the disks: StateResync if any disk needs a resync,
	// else StateInitial if any disk is still being copied, else
	// StateProtected.
	State    string  `json:"state"`
	Progress float64 `json:"progress"`         // initial replication over all disks, by bytes, 0..1
	Reason   string  `json:"reason,omitempty"` // why a resync is needed

	RPO      time.Duration `json:"rpo_ns"` // current data-loss window; meaningful only if RPOKnown
	RPOKnown bool          `json:"rpo_known"`

	LastPoint     *Point `json:"last_point,omitempty"` // latest recovery point; nil if none
	PointCount    int    `json:"point_count"`
	BytesReceived int64  `json:"bytes_received"`
	CacheBytes    int64  `json:"cache_bytes"`     // process-server backlog for this machine
	Error         string `json:"error,omitempty"` // last error to show on the machine

	Policy string `json:"policy"`          // replication policy assigned
	Group  string `json:"group,omitempty"` // replication group ("" for none)

	// LastScrub is when the replica was last checked against its block
	// checksums (zero: never), ScrubResult what that found.
	LastScrub   time.Time `json:"last_scrub,omitzero"`
	ScrubResult string    `json:"scrub_result,omitempty"`
	ScrubDamage bool      `json:"scrub_damage,omitempty"` // the last scrub found damage

	Disks []Disk `json:"disks"`
}

// ProcessServer is the process server's health as the console shows it
// (and the JSON of GET /api/v1/process-server).
type ProcessServer struct {
	BacklogBytes int64         `json:"backlog_bytes"`  // received, not yet applied to the target
	BacklogAge   time.Duration `json:"backlog_age_ns"` // age of the oldest data not yet applied
	UploadRate   float64       `json:"upload_rate"`    // bytes per second written to the target, last 10 s
	Uploaded     int64         `json:"uploaded"`       // bytes written to the target since the server started
	Compression  float64       `json:"compression"`    // uncompressed / compressed bytes received (0: none yet)
	CacheFree    float64       `json:"cache_free"`     // fraction of the cache disk free, 0..1
	CacheFreeB   uint64        `json:"cache_free_bytes"`
	CacheState   string        `json:"cache_state"` // ok, warning (under 30% free), critical (under 25%)
	CacheError   string        `json:"cache_error,omitempty"`
	Target       string        `json:"target"` // where replicated data lands, e.g. azure://acct/container
}

// Cache states of a ProcessServer.
const (
	CacheOK       = "ok"
	CacheWarning  = "warning"
	CacheCritical = "critical"
)

// Disk is one protected disk of a machine.
type Disk struct {
	Index    uint32  `json:"index"`
	Name     string  `json:"name"`
	Size     int64   `json:"size"` // bytes
	State    string  `json:"state"`
	Progress float64 `json:"progress"` // initial replication, 0..1
	Reason   string  `json:"reason,omitempty"`

	// Resync is the disk's pending, running or failed resync; nil if none.
	Resync *Resync `json:"resync,omitempty"`
}

// Resync is a disk's resync as the console shows it: why, when it starts,
// how far it is, and what went wrong last.
type Resync struct {
	State     string    `json:"state"` // ResyncScheduled, ResyncRunning or ResyncFailed
	Reason    string    `json:"reason"`
	Manual    bool      `json:"manual"`             // requested by an operator (ignores the resync window)
	Scheduled time.Time `json:"scheduled,omitzero"` // when a scheduled one starts
	Attempts  int       `json:"attempts"`           // failed attempts so far
	LastError string    `json:"last_error,omitempty"`
	Total     int64     `json:"total"`    // bytes to compare
	Compared  int64     `json:"compared"` // bytes compared so far
	Sent      int64     `json:"sent"`     // bytes of differing blocks sent
}

// States of a [Resync].
const (
	ResyncScheduled = "scheduled"
	ResyncRunning   = "running"
	ResyncFailed    = "failed"
)

// Point is a recovery point.
type Point struct {
	ID   string    `json:"id"`
	Time time.Time `json:"time"`
	Kind string    `json:"kind"` // PointCrash or PointApp
}

// Replication states of a machine or disk, as in [Machine.State].
const (
	StateInitial   = "initial"
	StateProtected = "protected"
	StateResync    = "resync"
)

// Kinds of recovery point, as in [Point.Kind].
const (
	PointCrash = "crash" // crash-consistent
	PointApp   = "app"   // application-consistent
)

// Backend is what the console needs from the server.
//
// Secrets and session ids come straight from the browser: implementations
// must compare them in constant time.
type Backend interface {
	// Machines returns every protected machine, in display order.
	Machines(ctx context.Context) ([]Machine, error)

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
	ProcessServer(ctx context.Context) (ProcessServer, error)
}

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

	r := chi.NewRouter()
	r.Use(securityHeaders)
	// Browsers say where a request comes from; refuse cross-origin POSTs
	// outright. Sessions carry a CSRF token on top of this, but the login
	// form has no session yet.
	r.Use(http.NewCrossOriginProtection().Handler)
	r.NotFound(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "404 page not found", http.StatusNotFound)
	})

	r.Handle("/static/*", http.StripPrefix("/static/", staticHandler()))
	r.Get("/login", auth.loginPage)
	r.Post("/login", auth.login)
	r.Group(func(r chi.Router) {
		r.Use(auth.requireSession)
		r.Get("/", machines.page)
		r.Get("/fragments/machines", machines.fragment)
		r.Get("/settings", settings.page)
		r.Get("/machines/{machine}/resync", machines.resyncPage)
		r.Group(func(r chi.Router) {
			r.Use(requireCSRF)
			r.Post("/logout", auth.logout)
			r.Post("/settings/password", settings.setPassword)
			r.Post("/machines/{machine}/resync", machines.startResync)
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
