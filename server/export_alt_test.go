package server

import "context"

// SetAlternateVerifiedHook sets the hook an alternate-location failback
// calls once its copy is verified, before its switch, with the job's
// context and id. Call it before the failback.
func SetAlternateVerifiedHook(s *Server, hook func(ctx context.Context, jobID string)) {
	s.fb.verifiedHook = hook
}
