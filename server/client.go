package server

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/asrdr/asr/server/pki"
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
	pool, err := pki.PoolFromPEM(caPEM)
	if err != nil {
		return nil, fmt.Errorf("server CA %s: %w", caFile, err)
	}
	u, err := url.Parse(serverURL)
	if err != nil || u.Scheme != "https" {
		return nil, fmt.Errorf("--server %q: want https://HOST:PORT", serverURL)
	}
	return &Client{URL: strings.TrimSuffix(serverURL, "/"), Token: string(tok), HTTP: &http.Client{
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}},
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
		var e struct {
			Error string `json:"error"`
		}
		msg := strings.TrimSpace(string(b))
		if json.Unmarshal(b, &e) == nil && e.Error != "" {
			msg = e.Error
		}
		return nil, fmt.Errorf("server: %s (HTTP %d)", msg, resp.StatusCode)
	}
	return resp, nil
}

// Image streams a disk image at a point; the caller closes the body.
func (c *Client) Image(ctx context.Context, machine, point, disk string) (io.ReadCloser, int64, error) {
	resp, err := c.open(ctx, http.MethodGet, "/api/v1/machines/"+url.PathEscape(machine)+"/points/"+
		url.PathEscape(point)+"/disks/"+url.PathEscape(disk)+"/image", nil)
	if err != nil {
		return nil, 0, err
	}
	return resp.Body, resp.ContentLength, nil
}

// Tag asks for a recovery point and waits for it.
func (c *Client) Tag(ctx context.Context, machine string, app bool, timeout time.Duration) (PointJSON, error) {
	var p PointJSON
	err := c.Do(ctx, http.MethodPost, "/api/v1/machines/"+url.PathEscape(machine)+"/points",
		TagRequest{App: app, Timeout: timeout.String()}, &p)
	return p, err
}
