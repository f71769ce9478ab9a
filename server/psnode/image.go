package psnode

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
	"github.com/asrdr/asr/replication/procserver"
	"github.com/asrdr/asr/server/api"
)

// A recovery through the configuration server (`asr recover`, the API's
// image stream) of a machine this process server serves: the configuration
// server asks for each disk's image (api.PSCommandImage), and this process
// server reads it as the built-in one does, through the point's checksums
// from the running applier's snapshot (procserver.Server.OpenPoint: the
// point's blocks that replication overwrites since are read from the
// copy-on-write data this applier keeps, so the image is the point's,
// bit-exact, while the machine goes on replicating here), and POSTs it to
// the configuration server (api.PSImagePath), which streams it on to its
// client. Its verdict (a damaged block, the blocks streamed as they are
// with AcceptDamage) is the command's result.

// imageStall ends an image's stream when no byte has moved for this long:
// the configuration server (or its client) stopped reading without
// closing. A stream is bounded by its progress, not its length (a disk of
// terabytes takes hours); the command's timeout bounds its start.
const imageStall = 10 * time.Minute

// image streams a disk at a recovery point to the configuration server
// (api.PSCommandImage).
func (n *Node) image(ctx context.Context, cmd api.PSCommand) api.PSCommandResult {
	if cmd.PointID == "" || cmd.Disk == "" {
		return api.PSCommandResult{Error: "an image command without its point or disk"}
	}
	p, err := n.cat.FindPoint(ctx, cmd.MachineID, cmd.PointID)
	if err != nil {
		return api.PSCommandResult{Error: err.Error()}
	}
	snap, err := n.ps.OpenPoint(ctx, cmd.MachineID, p, cmd.Disk, cmd.AcceptDamage)
	if err != nil {
		return api.PSCommandResult{Error: err.Error()}
	}
	defer snap.Close()
	n.log.Info("recovery image asked by the configuration server", "machine", cmd.MachineID, "point", p.ID, "disk", cmd.Disk, "command", cmd.ID)
	size := snap.Size()
	sctx, cancel := context.WithCancel(n.ctx)
	defer cancel()
	body := &imageBody{r: io.NewSectionReader(snap, 0, size), stall: time.AfterFunc(imageStall, cancel)}
	defer body.Close() // before snap.Close: no read of it after
	req, err := http.NewRequestWithContext(sctx, http.MethodPost, n.enrol.URL+api.PSImagePath+cmd.ID, body)
	if err != nil {
		return api.PSCommandResult{Error: err.Error()}
	}
	req.ContentLength = size
	req.Header.Set("Content-Type", "application/octet-stream")
	req.Header.Set(api.HeaderImageSize, strconv.FormatInt(size, 10))
	if snap.Checked() {
		req.Header.Set(api.HeaderImageChecked, "1")
	}
	// No client timeout: the stream is bounded by imageStall.
	err = enroll.Do(&http.Client{Transport: n.client.Transport}, req, nil)
	rerr := body.Close() // no read (and so no reset of the timer) after this
	stalled := !body.stall.Stop()
	switch {
	case rerr != nil:
		err = rerr // why the read stopped (a damaged block) says more than the request's end
	case err != nil && stalled:
		err = fmt.Errorf("no byte of the image moved for %s: %w", imageStall, err)
	}
	var de *replication.DamageError
	if errors.As(err, &de) {
		de.Also = n.ps.DamagedCopies(n.ctx, cmd.MachineID, cmd.Disk, de.Offset, p.ID)
		n.onDamage(cmd.MachineID, procserver.Damage{Disk: cmd.Disk, Point: p.ID, Blocks: []int64{de.Offset}, Found: "a recovery"})
		n.log.Error("a recovery's read found a damaged block", "machine", cmd.MachineID, "point", p.ID, "disk", cmd.Disk, "offset", de.Offset)
		return api.PSCommandResult{Error: de.Error()}
	}
	if err != nil {
		return api.PSCommandResult{Error: fmt.Sprintf("stream of disk %s at point %s to the configuration server: %v", cmd.Disk, p.ID, err)}
	}
	d := snap.Damaged()
	listed := d[:min(len(d), api.MaxPSImageDamaged)]
	return api.PSCommandResult{Damaged: listed, DamagedNotListed: int64(len(d) - len(listed))}
}

// imageBody is an image's request body: it records why a read failed,
// pushes back the stall timer at each read, and is read no more once
// closed (the transport may still hold it after the request ends; the
// snapshot under it closes next).
type imageBody struct {
	stall *time.Timer

	mu     sync.Mutex
	r      io.Reader
	closed bool
	err    error
}

func (b *imageBody) Read(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return 0, errors.New("image stream ended")
	}
	n, err := b.r.Read(p)
	if n > 0 {
		b.stall.Reset(imageStall)
	}
	if err != nil && err != io.EOF && b.err == nil {
		b.err = err
	}
	return n, err
}

// Close ends the reads and returns the first read error.
func (b *imageBody) Close() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.closed = true
	return b.err
}
