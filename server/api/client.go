package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/replication/enroll"
)

// Client is the operator side of the control API (used by the CLI).
type Client struct {
	URL   string
	Token string
	HTTP  *http.Client
}

// NewClient makes a client trusting only the vault CA in caFile.
func NewClient(serverURL, tokenFile, caFile string) (*Client, error) {
	tok, err := ReadSecretFile(tokenFile)
	if err != nil {
		return nil, fmt.Errorf("admin token: %w (give --token-file)", err)
	}
	caPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("server CA: %w (give --ca-file)", err)
	}
	pool, err := enroll.PoolFromPEM(caPEM)
	if err != nil {
		return nil, fmt.Errorf("server CA %s: %w", caFile, err)
	}
	u, err := url.Parse(serverURL)
	if err != nil || u.Scheme != "https" {
		return nil, fmt.Errorf("--server %q: want https://HOST:PORT", serverURL)
	}
	return &Client{URL: strings.TrimSuffix(serverURL, "/"), Token: string(tok), HTTP: &http.Client{
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, ReadBufferSize: ImageReadBuffer},
	}}, nil
}

// Do sends a request and decodes a JSON answer into out (if not nil).
func (c *Client) Do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = strings.NewReader(string(b))
	}
	resp, err := c.open(ctx, method, path, body)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

// Error is a server's error answer: its status and body (the message, and
// what the operator is asked to confirm, if anything).
type Error struct {
	Status int
	Body   ErrorBody
}

func (e *Error) Error() string { return fmt.Sprintf("server: %s (HTTP %d)", e.Body.Error, e.Status) }

// open sends a request and returns a successful response; the caller closes it.
func (c *Client) open(ctx context.Context, method, path string, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.URL+path, body)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+c.Token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.HTTP.Do(req)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		defer resp.Body.Close()
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		e := &Error{Status: resp.StatusCode}
		if json.Unmarshal(b, &e.Body) != nil || e.Body.Error == "" {
			e.Body.Error = strings.TrimSpace(string(b))
		}
		return nil, e
	}
	return resp, nil
}

// Image streams a disk image at a point. The caller reads exactly Size
// bytes from Body, then calls Finish, which reads the stream's end and
// reports the server's verdict (a damaged block, an error mid-stream), and
// closes it.
func (c *Client) Image(ctx context.Context, machine, point, disk string, accept bool) (*ImageStream, error) {
	path := "/api/v1/machines/" + url.PathEscape(machine) + "/points/" + url.PathEscape(point) + "/disks/" + url.PathEscape(disk) + "/image"
	if accept {
		path += "?accept_damage=1"
	}
	resp, err := c.open(ctx, http.MethodGet, path, nil)
	if err != nil {
		return nil, err
	}
	size, err := strconv.ParseInt(resp.Header.Get(HeaderImageSize), 10, 64)
	if err != nil || size < 0 {
		resp.Body.Close()
		return nil, fmt.Errorf("image of disk %s: the server sent no size", disk)
	}
	return &ImageStream{Body: resp.Body, Size: size, Checked: resp.Header.Get(HeaderImageChecked) == "1", resp: resp}, nil
}

// ImageStream is a disk image being streamed from the server.
type ImageStream struct {
	Body    io.Reader
	Size    int64
	Checked bool // every block is checked against the point's checksums
	resp    *http.Response
}

// Finish reads the rest of the stream and returns the offsets of damaged
// blocks the server streamed as they are (with accept; at most
// MaxPSImageDamaged) and how many more it did not list, or the error that
// cut the stream short.
func (s *ImageStream) Finish() (damaged []int64, notListed int64, err error) {
	defer s.resp.Body.Close()
	if _, err := io.Copy(io.Discard, io.LimitReader(s.resp.Body, 1<<20)); err != nil {
		return nil, 0, fmt.Errorf("image stream: %w", err)
	}
	if msg := s.resp.Trailer.Get(TrailerImageError); msg != "" {
		return nil, 0, fmt.Errorf("server: %s", msg)
	}
	if v := s.resp.Trailer.Get(TrailerDamaged); v != "" {
		parts := strings.Split(v, ",")
		if len(parts) > MaxPSImageDamaged {
			return nil, 0, fmt.Errorf("image stream: the server listed %d damaged blocks, at most %d", len(parts), MaxPSImageDamaged)
		}
		for _, f := range parts {
			off, err := strconv.ParseInt(f, 10, 64)
			if err != nil || off < 0 || off >= s.Size {
				return nil, 0, fmt.Errorf("image stream: bad damage list from the server")
			}
			damaged = append(damaged, off)
		}
	}
	if v := s.resp.Trailer.Get(TrailerDamagedMore); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 || n > s.Size/4096 {
			return nil, 0, fmt.Errorf("image stream: bad count of damaged blocks not listed from the server")
		}
		notListed = n
	}
	return damaged, notListed, nil
}

// Tag asks for a recovery point and waits for it.
func (c *Client) Tag(ctx context.Context, machine string, app bool, timeout time.Duration) (PointJSON, error) {
	var p PointJSON
	err := c.Do(ctx, http.MethodPost, "/api/v1/machines/"+url.PathEscape(machine)+"/points",
		TagRequest{App: app, Timeout: timeout.String()}, &p)
	return p, err
}

// Unprotect ends a machine's protection (disables its replication):
// its agent is refused from then on; its replica and recovery points are
// kept for recovery, or deleted with every record of the machine with
// deleteReplica. Calling it again finishes a removal cut short.
func (c *Client) Unprotect(ctx context.Context, machine string, deleteReplica bool) error {
	return c.Do(ctx, http.MethodPost, "/api/v1/machines/"+url.PathEscape(machine)+"/unprotect",
		UnprotectRequest{DeleteReplica: deleteReplica}, nil)
}

// Get returns the body of a GET (bounded to 64 MiB).
func (c *Client) Get(ctx context.Context, path string) ([]byte, error) {
	resp, err := c.open(ctx, http.MethodGet, path, nil)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	return io.ReadAll(io.LimitReader(resp.Body, 64<<20))
}

// Recovered describes what RecoverPoint or RecoverTime wrote.
type Recovered struct {
	Machine string
	Point   PointJSON // the point recovered, or the base of a time recovery
	LastSeq uint64    // time recovery: the last change included
	Disks   []replication.RecoveredDisk
}

// machine returns a machine (its name and disks) through the API.
func (c *Client) machine(ctx context.Context, machine string) (Machine, error) {
	var m Machine
	err := c.Do(ctx, http.MethodGet, "/api/v1/machines/"+url.PathEscape(machine), nil, &m)
	return m, err
}

// RecoverPoint writes every disk of a machine at a point ("latest" or an
// id) to dir/<disk>.img, streamed from the server, which checks every block
// against the point's checksums (a damaged block fails the recovery unless
// opts.AcceptDamage).
func (c *Client) RecoverPoint(ctx context.Context, machine, point, dir string, opts replication.RecoverOptions) (Recovered, error) {
	res := Recovered{Machine: machine}
	m, err := c.machine(ctx, machine)
	if err != nil {
		return res, err
	}
	// Resolve "latest" once so every disk comes from the same point.
	var points []PointJSON
	if err := c.Do(ctx, http.MethodGet, "/api/v1/machines/"+url.PathEscape(machine)+"/points", nil, &points); err != nil {
		return res, err
	}
	found := false
	for i := range points {
		if points[i].ID == point || (point == "latest" && i == len(points)-1) {
			res.Point, found = points[i], true
		}
	}
	if !found {
		if len(points) == 0 {
			return res, fmt.Errorf("machine %s has no recovery points yet", machine)
		}
		return res, fmt.Errorf("machine %s has no recovery point %q (see asr points)", machine, point)
	}
	for _, d := range m.Disks {
		img, err := c.Image(ctx, machine, res.Point.ID, d.Name, opts.AcceptDamage)
		if err != nil {
			return res, err
		}
		path := filepath.Join(dir, d.Name+".img")
		n, err := replication.WriteImageFile(ctx, replication.ProgressReader(img.Body, d.Name, img.Size, opts.Progress), img.Size, path)
		damaged, notListed, ferr := img.Finish()
		if ferr != nil {
			// The server's reason beats a short stream's.
			err = ferr
			os.Remove(path)
		}
		if err != nil {
			return res, fmt.Errorf("recover disk %s: %w", d.Name, err)
		}
		res.Disks = append(res.Disks, replication.RecoveredDisk{Name: d.Name, Path: path, Size: img.Size, Data: n,
			Checked: img.Checked, Damaged: damaged, DamagedNotListed: notListed})
	}
	return res, nil
}

// RecoverTime writes every disk of a machine as of instant at: the server
// plans (base point and kept segments), the images of the base point are
// streamed, and the segments replayed here up to at.
func (c *Client) RecoverTime(ctx context.Context, machine string, at time.Time, dir string, opts replication.RecoverOptions) (Recovered, error) {
	var plan TimePlanJSON
	if err := c.Do(ctx, http.MethodGet, "/api/v1/machines/"+url.PathEscape(machine)+"/timeplan?time="+url.QueryEscape(at.Format(time.RFC3339Nano)), nil, &plan); err != nil {
		return Recovered{Machine: machine}, err
	}
	res, err := c.RecoverPoint(ctx, machine, plan.Base, dir, opts)
	if err != nil {
		return res, err
	}
	m, err := c.machine(ctx, machine)
	if err != nil {
		return res, err
	}
	files := map[uint32]*os.File{}
	defer func() {
		for _, f := range files {
			f.Close()
		}
	}()
	for _, d := range m.Disks {
		if files[d.Index], err = os.OpenFile(filepath.Join(dir, d.Name+".img"), os.O_RDWR, 0); err != nil {
			return res, err
		}
	}
	seq, _ := strconv.ParseUint(plan.Base, 10, 64)
	tp := replication.TimePlan{At: at, Base: replication.Point{ID: plan.Base, Seq: seq}}
	for _, name := range plan.Segments {
		tp.Segments = append(tp.Segments, replication.SegmentInfo{Key: name})
	}
	res.LastSeq, err = replication.ReplaySegments(ctx, tp, func(si replication.SegmentInfo) ([]byte, error) {
		return c.Get(ctx, "/api/v1/machines/"+url.PathEscape(machine)+"/segments/"+url.PathEscape(si.Key))
	}, files)
	if err != nil {
		return res, err
	}
	for _, f := range files {
		if err := f.Sync(); err != nil {
			return res, err
		}
	}
	return res, nil
}

// ReadSecretFile reads a passphrase, token or password file, trimming
// surrounding white space.
func ReadSecretFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	b = bytes.TrimSpace(b)
	if len(b) == 0 {
		return nil, fmt.Errorf("%s is empty", path)
	}
	return b, nil
}

// ProcessServers lists the built-in process server and the scale-out ones
// (GET /api/v1/process-servers).
func (c *Client) ProcessServers(ctx context.Context) ([]ProcessServerInfo, error) {
	var out []ProcessServerInfo
	err := c.Do(ctx, http.MethodGet, "/api/v1/process-servers", nil, &out)
	return out, err
}

// RemoveProcessServer ends a scale-out process server's registration.
func (c *Client) RemoveProcessServer(ctx context.Context, name string) error {
	return c.Do(ctx, http.MethodDelete, "/api/v1/process-servers/"+url.PathEscape(name), nil, nil)
}

// SwitchProcessServer moves a machine to another process server (a
// scale-out one's name, BuiltinProcessServer, or AutoProcessServer); it
// returns the one it is on once the old one has handed the machine over.
func (c *Client) SwitchProcessServer(ctx context.Context, machine, to string) (string, error) {
	var out SwitchResult
	err := c.Do(ctx, http.MethodPost, "/api/v1/machines/"+url.PathEscape(machine)+"/process-server", SwitchRequest{To: to}, &out)
	return out.ProcessServer, err
}

// SwitchAll moves every machine of process server from to another.
func (c *Client) SwitchAll(ctx context.Context, from, to string) ([]string, error) {
	var out SwitchAllResult
	err := c.Do(ctx, http.MethodPost, "/api/v1/process-servers/"+url.PathEscape(from)+"/switch", SwitchRequest{To: to}, &out)
	return out.Moved, err
}
