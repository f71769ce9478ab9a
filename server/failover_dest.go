package server

import (
	"context"
	"errors"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/server/api"
	"github.com/asrdr/asr/store"
)

// Placeholders replaced as the destinations land (this commit is
// intermediate: these paths refuse with a plain error).

var errNotBuilt = errors.New("not built yet")

func (s *Server) plannedPoint(ctx context.Context, j *job, m store.Machine, id string) (replication.Point, error) {
	return replication.Point{}, errNotBuilt
}

func (s *Server) drill(ctx context.Context, j *job, f store.Failover, m store.Machine, exports []api.Export, req api.FailoverRequest) (*api.DrillResult, error) {
	return nil, errNotBuilt
}

func (s *Server) failoverToVSphere(ctx context.Context, j *job, f store.Failover, m store.Machine, p replication.Point, plan *replication.TimePlan, req api.FailoverRequest, d failoverDetail) (failoverDetail, []string, error) {
	return d, nil, errNotBuilt
}

func (s *Server) failoverToAzure(ctx context.Context, j *job, f store.Failover, m store.Machine, p replication.Point, plan *replication.TimePlan, req api.FailoverRequest, d failoverDetail) (failoverDetail, []string, error) {
	return d, nil, errNotBuilt
}

func (s *Server) removeVSphereVM(ctx context.Context, d *failoverDetail) error { return nil }
func (s *Server) removeAzureVM(ctx context.Context, d *failoverDetail) error   { return nil }
