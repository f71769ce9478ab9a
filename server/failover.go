package server

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/asrdr/asr/agent/nbd"
	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/overlay"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Recovery (failover.go, plans.go, drill and the vSphere and Azure
// destinations): a failover recovers a machine from one of its points and
// runs it somewhere.
//
// The server's own NBD exports are the instant way: each disk of the point
// is served read-write as MACHINE/DISK, reads coming from the point's
// snapshot (checked against its block checksums) and writes going to a
// copy-on-write overlay (replication/overlay) in DATA/failovers/ID/. Nothing
// is copied, so an export is ready in the time it takes to open the
// snapshot, whatever the disk's size. Replication and new points go on
// meanwhile: the snapshot never changes, and retention keeps every point a
// live failover holds (store.HeldPoints). A --time failover replays the
// kept changes after its base point into the overlay before serving.
//
// The exports are served on the NBD listener (Config.NBDListen, loopback by
// default: NBD has no authentication, so the exports belong on an isolated
// recovery network) and on a UNIX socket in the data directory, which the
// QEMU drills use from inside their network namespace.
//
// A failover's record (store.Failover) is written before anything is
// made, so a server that stops half way finds it at the next start: live
// exports are served again from their overlays; a drill or a failover that
// was still starting is marked failed and what it made is removed.

// DefaultNBDListen is where the exports are served unless configured.
const DefaultNBDListen = "127.0.0.1:10809"

// failoverState is the server's live exports.
type failoverState struct {
	mu sync.Mutex
	// exports by name (MACHINE/DISK); byMachine, the live failover's
	// exports of each machine.
	exports   map[string]*export
	byMachine map[string]*exported

	tcpL, unixL net.Listener
	sockPath    string
	srv         *nbd.Server
}

// exported is a machine's set of exports.
type exported struct {
	failoverID string
	machine    string // name
	disks      []*export
}

// export is one disk served over NBD.
type export struct {
	name string // MACHINE/DISK
	disk string
	ov   *overlay.Overlay
	base io.Closer
	be   *exportBackend // what the NBD server serves: ov, with failback's tracking
}

func failoverDir(dataDir, id string) string { return filepath.Join(dataDir, "failovers", id) }

// openNBD binds the NBD listeners.
func (s *Server) openNBD() error {
	addr := s.cfg.NBDListen
	if addr == "" {
		addr = "127.0.0.1:0" // `asr server` passes DefaultNBDListen
	}
	fs := &s.fo
	fs.exports, fs.byMachine = map[string]*export{}, map[string]*exported{}
	if addr != "off" {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("nbd listen %s: %w", addr, err)
		}
		fs.tcpL = l
	}
	// A UNIX socket path is at most 107 bytes: a long data directory's
	// socket goes to the temporary directory, named after it.
	sock := filepath.Join(s.cfg.DataDir, "nbd.sock")
	if abs, err := filepath.Abs(sock); err == nil {
		sock = abs
	}
	if len(sock) > 100 {
		h := sha256.Sum256([]byte(sock))
		sock = filepath.Join(os.TempDir(), "asr-nbd-"+hex.EncodeToString(h[:6])+".sock")
	}
	l, err := nbd.Listen("unix:" + sock)
	if err != nil {
		return fmt.Errorf("nbd socket %s: %w", sock, err)
	}
	fs.unixL, fs.sockPath = l, sock
	fs.srv = &nbd.Server{
		Lookup: s.lookupExport,
		List:   s.exportNames,
		Logger: s.cfg.Logger.With("component", "nbd"),
	}
	return nil
}

// NBDAddr is the NBD listener's address (nil when it is off).
func (s *Server) NBDAddr() net.Addr {
	if s.fo.tcpL == nil {
		return nil
	}
	return s.fo.tcpL.Addr()
}

// NBDSocket is the UNIX socket the exports are served on too.
func (s *Server) NBDSocket() string { return s.fo.sockPath }

func (s *Server) serveNBD(ctx context.Context) {
	var wg sync.WaitGroup
	for _, l := range []net.Listener{s.fo.tcpL, s.fo.unixL} {
		if l == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := s.fo.srv.Serve(ctx, l); err != nil {
				s.log.Error("nbd listener", "err", err)
			}
		}()
	}
	wg.Wait()
}

func (s *Server) lookupExport(name string) (nbd.Backend, bool) {
	s.fo.mu.Lock()
	defer s.fo.mu.Unlock()
	e, ok := s.fo.exports[name]
	if !ok {
		return nil, false
	}
	return e.be, true
}

func (s *Server) exportNames() []string {
	s.fo.mu.Lock()
	defer s.fo.mu.Unlock()
	names := make([]string, 0, len(s.fo.exports))
	for n := range s.fo.exports {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// exportURI is the NBD URI of an export on the TCP listener.
func (s *Server) exportURI(name string) string {
	if s.fo.tcpL == nil {
		return ""
	}
	host, port, _ := net.SplitHostPort(s.fo.tcpL.Addr().String())
	if ip := net.ParseIP(host); ip == nil || ip.IsUnspecified() {
		host = "127.0.0.1"
		if s.cfg.AdvertiseURL != "" {
			if h, _, err := net.SplitHostPort(strings.TrimPrefix(s.cfg.AdvertiseURL, "https://")); err == nil {
				host = h
			}
		}
	}
	return "nbd://" + net.JoinHostPort(host, port) + "/" + name
}

func (s *Server) exportSocketURI(name string) string {
	return "nbd+unix:///" + name + "?socket=" + s.fo.sockPath
}

// exportMachine serves every disk of point p (after replaying plan's
// changes when plan is set) under MACHINE/DISK, from overlays in the
// failover's directory (kept if they exist: a restart serves them again).
func (s *Server) exportMachine(ctx context.Context, f store.Failover, m store.Machine, p replication.Point, plan *replication.TimePlan) ([]api.Export, error) {
	ex, err := s.openRecovered(ctx, f, m, p, plan)
	if err != nil {
		return nil, err
	}
	s.fo.mu.Lock()
	if old := s.fo.byMachine[m.ID]; old != nil {
		s.fo.mu.Unlock()
		ex.close()
		return nil, fmt.Errorf("machine %s is exported already (failover %s)", m.Name, old.failoverID)
	}
	for _, e := range ex.disks {
		s.fo.exports[e.name] = e
	}
	s.fo.byMachine[m.ID] = ex
	s.fo.mu.Unlock()
	return s.exportsOf(m.ID), nil
}

// openRecovered opens every disk of point p as an overlay in the
// failover's directory (replaying plan's changes into new overlays): the
// machine as recovered, read-write, nothing copied.
func (s *Server) openRecovered(ctx context.Context, f store.Failover, m store.Machine, p replication.Point, plan *replication.TimePlan) (*exported, error) {
	dir := failoverDir(s.cfg.DataDir, f.ID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	mc, err := s.cat.Machine(ctx, m.ID)
	if err != nil {
		return nil, err
	}
	ex := &exported{failoverID: f.ID, machine: m.Name}
	fresh := true
	for _, idx := range p.Disks {
		d, ok := mc.Disk(idx)
		if !ok {
			ex.close()
			return nil, fmt.Errorf("point %s names disk %d, unknown to machine %s: %w", p.ID, idx, m.Name, replication.ErrCorrupt)
		}
		if _, err := os.Stat(filepath.Join(dir, d.Name+".map")); err == nil {
			fresh = false
		}
		base, err := openPointReader(ctx, s.cat, mc, p, d.Index)
		if err != nil {
			ex.close()
			return nil, fmt.Errorf("open point %s of disk %s: %w", p.ID, d.Name, err)
		}
		ov, err := overlay.Open(dir, d.Name, base, base.Size())
		if err != nil {
			base.Close()
			ex.close()
			return nil, err
		}
		ex.disks = append(ex.disks, &export{name: m.Name + "/" + d.Name, disk: d.Name, ov: ov, base: base, be: &exportBackend{ov: ov}})
	}
	if plan != nil && fresh {
		if err := s.replayInto(ctx, mc, *plan, ex); err != nil {
			ex.close()
			return nil, fmt.Errorf("replay the changes after point %s: %w", p.ID, err)
		}
	}
	return ex, nil
}

// close closes the overlays and their bases (keeping the files).
func (ex *exported) close() error {
	var first error
	for _, e := range ex.disks {
		if err := e.ov.Close(); err != nil && first == nil {
			first = err
		}
		e.base.Close()
	}
	return first
}

// openPointReader opens a disk at a point through its own handles on the
// replica (not the process server's): the export outlives the machine's
// applier (a committed failover unprotects the machine) and holds the
// replica open, so it is not deleted under the running machine.
func openPointReader(ctx context.Context, cat *replication.Catalog, mc replication.MachineCatalog, p replication.Point, idx uint32) (*replication.CheckedReader, error) {
	rd, err := cat.T.OpenDisk(ctx, replication.DiskKey(mc.ID, idx), 0)
	if err != nil {
		return nil, err
	}
	var sums replication.ReplicaDisk
	if p.Sums {
		if sums, err = cat.T.OpenDisk(ctx, replication.SumKey(mc.ID, idx), 0); err != nil {
			rd.Close()
			return nil, err
		}
	}
	r, err := replication.OpenPointDisk(ctx, mc, p, idx, rd, sums, false)
	if err != nil {
		rd.Close()
		if sums != nil {
			sums.Close()
		}
		return nil, err
	}
	if sums != nil {
		r.CloseAlso(rd, sums)
	} else {
		r.CloseAlso(rd)
	}
	return r, nil
}

// replayInto writes the kept changes of plan into the overlays and flushes
// them: the exports then read as the machine at the plan's time.
func (s *Server) replayInto(ctx context.Context, mc replication.MachineCatalog, plan replication.TimePlan, ex *exported) error {
	ws := map[uint32]io.WriterAt{}
	for _, e := range ex.disks {
		d := slices.IndexFunc(mc.Disks, func(cd replication.CatalogDisk) bool { return cd.Name == e.disk })
		if d < 0 {
			return fmt.Errorf("disk %s unknown to the catalog", e.disk)
		}
		ws[mc.Disks[d].Index] = overlayWriter{e.ov}
	}
	if _, err := replication.ReplayInto(ctx, plan, func(si replication.SegmentInfo) ([]byte, error) { return s.cat.Segment(ctx, si) }, ws); err != nil {
		return err
	}
	for _, e := range ex.disks {
		if err := e.ov.Flush(); err != nil {
			return err
		}
	}
	return nil
}

type overlayWriter struct{ ov *overlay.Overlay }

func (w overlayWriter) WriteAt(p []byte, off int64) (int, error) {
	if err := w.ov.WriteAt(p, off, false); err != nil {
		return 0, err
	}
	return len(p), nil
}

// exportsOf lists a machine's live exports.
func (s *Server) exportsOf(machineID string) []api.Export {
	s.fo.mu.Lock()
	defer s.fo.mu.Unlock()
	ex := s.fo.byMachine[machineID]
	if ex == nil {
		return nil
	}
	out := make([]api.Export, len(ex.disks))
	for i, e := range ex.disks {
		out[i] = api.Export{Disk: e.disk, URI: s.exportURI(e.name), Socket: s.exportSocketURI(e.name), Size: e.ov.Size(), Written: e.ov.WrittenBytes()}
	}
	return out
}

// unexport stops serving a machine's exports and closes their overlays;
// with remove their files go too.
func (s *Server) unexport(machineID, failoverID string, remove bool) error {
	s.fo.mu.Lock()
	ex := s.fo.byMachine[machineID]
	if ex != nil {
		delete(s.fo.byMachine, machineID)
		for _, e := range ex.disks {
			delete(s.fo.exports, e.name)
		}
	}
	s.fo.mu.Unlock()
	var first error
	if ex != nil {
		first = ex.close()
	}
	if remove && failoverID != "" {
		if err := os.RemoveAll(failoverDir(s.cfg.DataDir, failoverID)); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// closeNBD stops serving and closes every overlay (keeping the files).
func (s *Server) closeNBD() {
	for _, l := range []net.Listener{s.fo.tcpL, s.fo.unixL} {
		if l != nil {
			l.Close()
		}
	}
	s.fo.mu.Lock()
	ids := make([]string, 0, len(s.fo.byMachine))
	for id := range s.fo.byMachine {
		ids = append(ids, id)
	}
	s.fo.mu.Unlock()
	for _, id := range ids {
		s.unexport(id, "", false)
	}
}

// failoverDetail is what a failover's record keeps besides its columns.
type failoverDetail struct {
	// Request is the request that made it (a change of point makes the
	// same again).
	Request json.RawMessage  `json:"request,omitempty"`
	Exports []api.Export     `json:"exports,omitempty"`
	VM      string           `json:"vm,omitempty"`
	VSphere *vsphereDetail   `json:"vsphere,omitempty"`
	Azure   json.RawMessage  `json:"azure,omitempty"`
	Drill   *api.DrillResult `json:"drill,omitempty"`
	// Reverse is the failback's state (failback.go).
	Reverse *reverseDetail `json:"reverse,omitempty"`
}

type vsphereDetail struct {
	VCenter string `json:"vcenter"`
	Ref     string `json:"ref"`
	Name    string `json:"name"`
	// UUID is the VM's BIOS UUID ("" in records made before it was
	// kept: the inventory is asked).
	UUID string `json:"uuid,omitempty"`
}

func decodeDetail(f store.Failover) failoverDetail {
	var d failoverDetail
	json.Unmarshal([]byte(f.Detail), &d)
	return d
}

func encodeDetail(d failoverDetail) string {
	b, _ := json.Marshal(d)
	return string(b)
}

func newID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// resolvePoint finds the point a failover recovers: sel is a point id,
// "latest" (or ""), or "latest-app"; with at set, the newest point at or
// before it with the kept changes to replay up to it.
func (s *Server) resolvePoint(ctx context.Context, m store.Machine, sel string, at *time.Time) (replication.Point, *replication.TimePlan, error) {
	if at != nil {
		if sel != "" && sel != "latest" {
			return replication.Point{}, nil, errorf(http.StatusBadRequest, "give a point or a time, not both")
		}
		plan, err := s.cat.PlanTime(ctx, m.ID, *at)
		if errors.Is(err, replication.ErrTimeOutOfRange) {
			return replication.Point{}, nil, errorf(http.StatusUnprocessableEntity, "machine %s: %v", m.Name, err)
		}
		if err != nil {
			return replication.Point{}, nil, err
		}
		return plan.Base, &plan, nil
	}
	if sel == "latest-app" {
		ps, err := s.cat.Points(ctx, m.ID)
		if err != nil {
			return replication.Point{}, nil, err
		}
		for i := len(ps) - 1; i >= 0; i-- {
			if ps[i].Kind == replication.PointApp {
				p, err := s.cat.FindPoint(ctx, m.ID, ps[i].ID)
				return p, nil, err
			}
		}
		return replication.Point{}, nil, errorf(http.StatusNotFound, "machine %s has no application-consistent point", m.Name)
	}
	p, err := s.cat.FindPoint(ctx, m.ID, sel)
	if err != nil {
		return p, nil, fmt.Errorf("machine %s: %w", m.Name, err)
	}
	return p, nil, nil
}

// failoverView is the API's form of a failover record.
func (s *Server) failoverView(ctx context.Context, f store.Failover) api.Failover {
	v := api.Failover{ID: f.ID, MachineID: f.MachineID, Kind: f.Kind, To: f.Dest, State: f.State, Point: f.PointID,
		Plan: f.Plan, JobID: f.JobID, Created: f.CreatedAt, Ended: f.EndedAt}
	if m, err := s.db.Machine(ctx, f.MachineID); err == nil {
		v.Machine = m.Name
	}
	if !f.AtTime.IsZero() {
		t := f.AtTime
		v.Time = &t
	}
	if p, err := s.cat.FindPoint(ctx, f.MachineID, f.PointID); err == nil {
		v.PointTime = p.Time
	}
	if req, err := failoverRequest(f); err == nil {
		v.Planned = req.Planned
	}
	d := decodeDetail(f)
	v.VM, v.Drill = d.VM, d.Drill
	if r := d.Reverse; r != nil {
		v.Failback = &api.FailbackStatus{State: r.State, Sent: r.Sent, Compared: r.Compared, Forward: r.Forward, Resynced: r.Resynced, Resent: r.Resent, VM: alternateVM(r)}
		if run := s.reverseRunOf(f.MachineID); run != nil && run.failoverID == f.ID {
			v.Failback.Sent, v.Failback.Pending = run.total(), run.pending()
		} else if r.State == dirReprotected && r.vmPass() != nil {
			v.Failback.Sent += s.streamedOf(f) // the recovered VM's agent's stream
		}
		v.Failback.Checksum = s.checksumView(f, r)
	}
	if live := s.exportsOf(f.MachineID); live != nil && f.Live() {
		v.Exports = live
	} else {
		v.Exports = d.Exports
	}
	return v
}

// Failovers lists the live failovers (and the ended ones with all).
func (s *Server) Failovers(ctx context.Context, all bool) ([]api.Failover, error) {
	fs, err := s.db.Failovers(ctx, all)
	if err != nil {
		return nil, err
	}
	out := make([]api.Failover, 0, len(fs))
	for _, f := range fs {
		out = append(out, s.failoverView(ctx, f))
	}
	return out, nil
}

// restoreFailovers serves again, at start, the exports of live failovers,
// and ends those a stop cut short.
func (s *Server) restoreFailovers(ctx context.Context) error {
	fs, err := s.db.Failovers(ctx, false)
	if err != nil {
		return err
	}
	// Plans' failbacks past their switch: their machines are theirs.
	pfs, err := s.loadPlanFailbacks(ctx)
	if err != nil {
		return err
	}
	for _, f := range fs {
		m, err := s.db.Machine(ctx, f.MachineID)
		if err != nil {
			continue
		}
		serving := (f.Dest == api.ToNBD) && f.State != store.FailoverStarting
		if !serving {
			if f.State == store.FailoverCommitted && vmFailback(f) {
				s.restoreReverse(ctx, f, m) // a failback past its switch
			}
			if f.State == store.FailoverStarting || f.Dest == api.ToQEMU {
				// Cut short (or a drill, which lives only with its job):
				// what it made is removed by the same path as a cleanup.
				f.State = store.FailoverFailed
				s.removeFailoverResources(ctx, f, m, nil)
				if err := s.db.UpdateFailover(ctx, f); err != nil {
					return err
				}
				s.raise(ctx, store.Event{MachineID: m.ID, Severity: "warning", Kind: "failover-interrupted",
					Message: fmt.Sprintf("the %s to %s was interrupted by a server stop: run it again", kindWord(f.Kind), f.Dest)})
			}
			continue
		}
		p, err := s.cat.FindPoint(ctx, m.ID, f.PointID)
		if err == nil {
			_, err = s.exportMachine(ctx, f, m, p, nil)
		}
		if err == nil {
			s.restoreReverse(ctx, f, m)
		}
		if err != nil {
			s.log.Error("serve a failover's exports again", "machine", m.Name, "failover", f.ID, "err", err)
			s.raise(ctx, store.Event{MachineID: m.ID, Severity: "error", Kind: "failover-exports",
				Message: fmt.Sprintf("the exports of %s %s could not be served again: %v", kindWord(f.Kind), f.ID, err)})
		}
	}
	return s.resumePlanFailbacks(ctx, pfs)
}

func kindWord(kind string) string {
	if kind == api.FailoverTest {
		return "test failover"
	}
	return "failover"
}
