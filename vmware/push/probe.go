package push

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// ProbeCommand is the asr subcommand Install runs on the guest, with the
// copied binary, to check that the guest reaches the server: `asr
// probe-tcp HOST:PORT...`. The command line dispatches it to ProbeMain.
const ProbeCommand = "probe-tcp"

// probeTimeout bounds each connection attempt of the probe.
const probeTimeout = 5 * time.Second

// ProbeMain implements `asr probe-tcp HOST:PORT...`: it opens (and closes)
// a TCP connection to every address at once and prints "ok ADDR" or
// "fail ADDR: REASON" for each, in the order given. The exit status is 0
// when every address was reached, 1 when one was not, 2 on bad usage.
func ProbeMain(args []string) int {
	return probe(context.Background(), os.Stdout, os.Stderr, args, probeTimeout)
}

func probe(ctx context.Context, stdout, stderr io.Writer, args []string, timeout time.Duration) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: asr "+ProbeCommand+" HOST:PORT...")
		return 2
	}
	for _, a := range args {
		if _, _, err := net.SplitHostPort(a); err != nil {
			fmt.Fprintf(stderr, "asr %s: %q: want HOST:PORT\n", ProbeCommand, a)
			return 2
		}
	}
	errs := make([]error, len(args))
	var wg sync.WaitGroup
	for i, a := range args {
		wg.Go(func() {
			var d net.Dialer
			cctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			c, err := d.DialContext(cctx, "tcp", a)
			if err == nil {
				c.Close()
			}
			errs[i] = err
		})
	}
	wg.Wait()
	code := 0
	for i, a := range args {
		if errs[i] != nil {
			fmt.Fprintf(stdout, "fail %s: %v\n", a, errs[i])
			code = 1
		} else {
			fmt.Fprintf(stdout, "ok %s\n", a)
		}
	}
	return code
}
