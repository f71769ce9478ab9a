package api

import (
	"context"
	"net/http"
	"net/url"
)

func (c *Client) Unprotect(ctx context.Context, machine string, deleteReplica bool) error {
	return c.Do(ctx, http.MethodPost, "/api/v1/machines/"+url.PathEscape(machine)+"/unprotect", map[string]bool{"delete_replica": deleteReplica}, nil)
}
