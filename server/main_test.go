package server_test

import (
	"fmt"
	"os"
	"testing"

	"github.com/asrdr/asr/replication"
	"github.com/asrdr/asr/vmware/vcsim"
)

// TestMain makes the passphrase key derivation cheap for this package's
// tests: each server start derives the vault and registration keys and
// each agent registers with Argon2id at the vault's cost (64 MiB, 2
// passes), about 0.2 s idle and many seconds under -race on a loaded
// machine, which the tests here pay some eighty times. What the cost buys
// is measured in BENCHMARKS.md ("Registration"), and the end-to-end tests
// run the real binary at the real cost.
func TestMain(m *testing.M) {
	replication.VaultKDF = replication.KDFParams{Time: 1, Memory: 1 << 10, Threads: 1}
	// The vCenter simulators the tests run side by side, created before
	// any runs (vcsim.Prepare says why); a test past the count fails.
	if err := vcsim.Prepare(32); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	vcsim.Discard()
	os.Exit(code)
}
