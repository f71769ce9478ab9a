package server

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/go-chi/chi/v5"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Reading the points of a machine served by a scale-out process server:
// `asr verify --point` (a command, api.PSCommandCheckPoint) and `asr
// recover` through this server (api.PSCommandImage: the process server
// POSTs the image here, streamed on to the recovery's client). The
// process server reads them, not this one: a point's blocks are not
// immutable on the target. The local target keeps a point's blocks in
// the replica itself until replication overwrites them, and the applier
// saves the old contents to the point's copy-on-write file just before
// (its index in the applier's memory), and retention merges those files
// when it deletes a point; only the process that applies the machine
// reads a point consistently while it replicates (as the built-in one
// does for its own machines: procserver.Server.OpenPoint). Reading the
// replica here, from another process, could mix the point's blocks with
// later ones.

// psImageStart bounds how long a recovery waits for the process server
// to start streaming an image (its next heartbeat, then opening the point).
const psImageStart = 2 * time.Minute

// psImage is an image stream awaited from a scale-out process server,
// under its command's id: the POST handler hands it over on got (once:
// taken); gone closes when the recovery waiting for it ends.
type psImage struct {
	ps    string
	got   chan *psUpload // buffered: one
	gone  chan struct{}
	taken bool // under s.pss.mu
}

// psUpload is an image POSTed by a process server: its body, read by the
// recovery, which says on done (buffered: one) how the copy ended.
type psUpload struct {
	body    io.Reader
	size    int64
	checked bool
	done    chan error
}

// psImageStream serves a disk image at a point of machine m, which
// scale-out process server ps serves (handleImage's stream, the same
// headers and trailers): ps is asked for the image, which it POSTs to
// handlePSImage, and the stream goes on to w as it comes. The verdict
// (a damaged block, or the blocks streamed as they are with accept) is the
// command's result, after the stream.
func (s *Server) psImageStream(w http.ResponseWriter, r *http.Request, m store.Machine, ps string, p replication.Point, disk string, accept bool) error {
	ctx := r.Context()
	if !slices.ContainsFunc(m.Disks, func(d store.Disk) bool { return d.Name == disk }) {
		return errorf(http.StatusNotFound, "machine %s has no disk %q", m.Name, disk)
	}
	img := &psImage{ps: ps, got: make(chan *psUpload, 1), gone: make(chan struct{})}
	c, withdraw, err := s.psSend(ps, api.PSCommand{Kind: api.PSCommandImage, MachineID: m.ID, PointID: p.ID, Disk: disk,
		AcceptDamage: accept, Timeout: psImageStart}, img)
	if err != nil {
		return err
	}
	defer withdraw()
	start, cancel := context.WithTimeout(ctx, psImageStart)
	defer cancel()
	var up *psUpload
	select {
	case up = <-img.got:
	case res := <-c.done:
		// An answer before any stream: it could not open the point's disk.
		if res.Error == "" {
			res.Error = "it answered without streaming the image"
		}
		return errorf(http.StatusConflict, "process server %s, which serves %s: %s", ps, m.Name, res.Error)
	case <-start.Done():
		return fmt.Errorf("process server %s did not start streaming disk %s at point %s: %w", ps, disk, p.ID, start.Err())
	}
	startImage(w, up.size, up.checked, p.ID)
	n, err := io.CopyBuffer(w, up.body, make([]byte, 1<<20))
	if err == nil && n != up.size {
		err = io.ErrUnexpectedEOF
	}
	up.done <- err
	var verdict string
	if err != nil {
		verdict = fmt.Sprintf("the image from process server %s stopped after %d of %d bytes: %v", ps, n, up.size, err)
	}
	// Its verdict comes once its POST is answered (the heartbeat it sends
	// at once).
	wait, wcancel := context.WithTimeout(ctx, psCommandWait)
	defer wcancel()
	select {
	case res := <-c.done:
		switch {
		case res.Error != "":
			verdict = res.Error // its reason beats a short stream's
		case verdict != "":
		case len(res.Damaged) > 0 && !accept:
			verdict = fmt.Sprintf("process server %s listed damaged blocks of an image streamed without accepting damage", ps)
		default:
			for _, off := range res.Damaged {
				if off < 0 || off >= up.size {
					verdict = fmt.Sprintf("process server %s listed a damaged block at %d, outside the image of %d bytes", ps, off, up.size)
					break
				}
			}
			if verdict == "" {
				setDamagedTrailer(w, res.Damaged, res.DamagedNotListed)
			}
		}
	case <-wait.Done():
		if verdict == "" {
			verdict = fmt.Sprintf("process server %s did not say whether the image of disk %s at point %s is whole: %v", ps, disk, p.ID, wait.Err())
		}
	}
	if verdict != "" {
		w.Header().Set(api.TrailerImageError, verdict)
	}
	return nil
}

// handlePSImage takes the image a scale-out process server POSTs for a
// recovery that waits for it (api.PSImagePath + the command's id, its
// client certificate naming the process server the command went to),
// and returns once the recovery has copied it on.
func (s *Server) handlePSImage(w http.ResponseWriter, r *http.Request) error {
	p, err := s.psFromCert(r.Context(), r)
	if err != nil {
		return err
	}
	id := chi.URLParam(r, "id")
	size, err := strconv.ParseInt(r.Header.Get(api.HeaderImageSize), 10, 64)
	if err != nil || size < 0 || size > replication.MaxDiskSize || r.ContentLength != size {
		return errorf(http.StatusBadRequest, "an image of %q bytes in a body of %d: want its size, at most %d, in %s and as the body's length",
			r.Header.Get(api.HeaderImageSize), r.ContentLength, int64(replication.MaxDiskSize), api.HeaderImageSize)
	}
	s.pss.mu.Lock()
	img := s.pss.images[id]
	ok := img != nil && img.ps == p.Name && !img.taken
	if ok {
		img.taken = true
	}
	s.pss.mu.Unlock()
	if !ok {
		return errorf(http.StatusNotFound, "no recovery waits for image %q of process server %s (ended, or streamed already)", id, p.Name)
	}
	up := &psUpload{body: r.Body, size: size, checked: r.Header.Get(api.HeaderImageChecked) == "1", done: make(chan error, 1)}
	img.got <- up
	var copyErr error
	select {
	case copyErr = <-up.done:
	case <-img.gone:
		select {
		case copyErr = <-up.done:
		default:
			return errorf(http.StatusGone, "the recovery that asked for image %s ended before it was streamed", id)
		}
	case <-r.Context().Done():
		return r.Context().Err()
	}
	if copyErr != nil {
		return errorf(http.StatusConflict, "the image was not streamed whole to the recovery: %v", copyErr)
	}
	w.WriteHeader(http.StatusNoContent)
	return nil
}

// psCheckPoint reads every disk of point pointID of machine m through
// its checksums on scale-out process server ps, which serves m (`asr
// verify --point`): the point check's entries, and the damaged blocks
// its lists leave out (past api.MaxPSScrubDamaged each).
func (s *Server) psCheckPoint(ctx context.Context, ps string, m store.Machine, pointID string) ([]procserver.PointScrub, int64, error) {
	r, err := s.psCommand(ctx, ps, api.PSCommand{Kind: api.PSCommandCheckPoint, MachineID: m.ID, PointID: pointID, Timeout: api.MaxPSCommandTimeout})
	switch {
	case err != nil:
		return nil, 0, err
	case r.Error != "":
		return nil, 0, fmt.Errorf("process server %s: %s", ps, r.Error)
	case r.Scrub == nil:
		return nil, 0, fmt.Errorf("process server %s answered the check of point %s without a report", ps, pointID)
	}
	if len(r.Scrub.Disks) > 0 || len(r.Scrub.Points) > replication.MaxDisks {
		return nil, 0, fmt.Errorf("process server %s answered the check of point %s with %d disks and %d points (at most %d)", ps, pointID, len(r.Scrub.Disks), len(r.Scrub.Points), replication.MaxDisks)
	}
	for _, e := range r.Scrub.Points {
		if e.Point != pointID {
			return nil, 0, fmt.Errorf("process server %s answered the check of point %s with point %s", ps, pointID, e.Point)
		}
	}
	return r.Scrub.Points, r.ScrubDamagedNotListed, nil
}
