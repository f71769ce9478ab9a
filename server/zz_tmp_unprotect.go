package server

import (
	"context"
	"errors"
)

func (s *Server) Unprotect(ctx context.Context, machine string, deleteReplica bool) error {
	return errors.New("tmp")
}
