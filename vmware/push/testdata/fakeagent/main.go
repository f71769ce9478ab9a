// Command fakeagent stands in for asr in the push tests: `probe-tcp` is the
// real one (push.ProbeMain); any other command line is reported, with the
// process id and the build's version, as one JSON line to the unix socket
// given by --notify, whose connection stays open until the process exits
// on SIGTERM: the test sees the start and the stop as they happen.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/asrdr/asr/vmware/push"
)

var version = "1"

func main() {
	if len(os.Args) > 1 && os.Args[1] == push.ProbeCommand {
		os.Exit(push.ProbeMain(os.Args[2:]))
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	notify := ""
	for i, a := range os.Args {
		if a == "--notify" && i+1 < len(os.Args) {
			notify = os.Args[i+1]
		}
	}
	if notify == "" {
		fmt.Fprintln(os.Stderr, "fakeagent: no --notify")
		os.Exit(2)
	}
	c, err := net.Dial("unix", notify)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fakeagent:", err)
		os.Exit(1)
	}
	json.NewEncoder(c).Encode(map[string]any{"pid": os.Getpid(), "args": os.Args, "version": version})
	<-ctx.Done()
	c.Close()
}
