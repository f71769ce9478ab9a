package server

import "github.com/asrdr/asr/replication/procserver"

// ProcessServerForTest is the server's process server, for tests that
// watch replication without the vault database.
func (s *Server) ProcessServerForTest() *procserver.Server { return s.ps }
