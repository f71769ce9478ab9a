// Command asr is open-source disaster recovery for VMware virtual machines:
// one static binary that runs as the configuration/process server, as the
// agent on protected guests, as a self-contained demo, and as the operator
// CLI. See README.md and docs/ARCHITECTURE.md; the commands are in
// server/cli.
package main

import (
	"os"

	"github.com/asrdr/asr/server/cli"
)

// version is set at build time with -ldflags "-X main.version=...";
// empty, it is read from the module's build information.
var version = ""

func main() {
	os.Exit(cli.Main(os.Args[1:], os.Stdout, os.Stderr, version))
}
