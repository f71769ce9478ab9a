package server

// SetResyncHook sets the hook that the starts of resyncs call (see
// resyncStarts). Call it before Run.
func SetResyncHook(s *Server, hook func(event string)) { s.resyncStart.hook = hook }

// LoopTicks counts the passes of the loop that starts resyncs and
// schedules scrubs.
func LoopTicks(s *Server) int64 { return s.loopTicks.Load() }
