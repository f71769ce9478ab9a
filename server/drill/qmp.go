package drill

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"
)

// qmpTimeout bounds one QMP exchange.
const qmpTimeout = 5 * time.Second

// qmpClient is a minimal QMP client: enough to run a human monitor
// command. It is used by one goroutine.
type qmpClient struct {
	c   net.Conn
	dec *json.Decoder
}

type qmpMessage struct {
	QMP    json.RawMessage `json:"QMP"`
	Event  string          `json:"event"`
	Return json.RawMessage `json:"return"`
	Error  *struct {
		Class string `json:"class"`
		Desc  string `json:"desc"`
	} `json:"error"`
}

func dialQMP(ctx context.Context, path string) (*qmpClient, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return nil, fmt.Errorf("qmp: %w", err)
	}
	q := &qmpClient{c: c, dec: json.NewDecoder(c)}
	_ = c.SetDeadline(time.Now().Add(qmpTimeout))
	var greeting qmpMessage
	if err := q.dec.Decode(&greeting); err != nil || greeting.QMP == nil {
		c.Close()
		return nil, fmt.Errorf("qmp greeting: %v", err)
	}
	if _, err := q.execute(ctx, "qmp_capabilities", nil); err != nil {
		c.Close()
		return nil, err
	}
	return q, nil
}

func (q *qmpClient) Close() error { return q.c.Close() }

func (q *qmpClient) execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	stop := context.AfterFunc(ctx, func() { _ = q.c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	_ = q.c.SetDeadline(time.Now().Add(qmpTimeout))
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	if err := json.NewEncoder(q.c).Encode(req); err != nil {
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	for {
		var m qmpMessage
		if err := q.dec.Decode(&m); err != nil {
			return nil, fmt.Errorf("qmp %s: %w", cmd, err)
		}
		switch {
		case m.Event != "":
			continue // asynchronous events interleave with replies
		case m.Error != nil:
			return nil, fmt.Errorf("qmp %s: %s: %s", cmd, m.Error.Class, m.Error.Desc)
		case m.Return != nil:
			return m.Return, nil
		}
	}
}

// hmp runs a human monitor command and returns its output.
func (q *qmpClient) hmp(ctx context.Context, cmd string) (string, error) {
	raw, err := q.execute(ctx, "human-monitor-command", map[string]string{"command-line": cmd})
	if err != nil {
		return "", err
	}
	var out string
	if err := json.Unmarshal(raw, &out); err != nil {
		return "", fmt.Errorf("qmp %s: %w", cmd, err)
	}
	return out, nil
}

// usernetState finds, in "info usernet" output, the TCP connections
// QEMU's host forward from fwdPort made to guest port dstPort, and
// returns ESTABLISHED if one of them is, else the state of one of them
// (such as SYN_SENT); found is false when there is none. The table shows
// the forward's own port, not the connecting client's, as the source:
//
//	Hub -1 (n0):
//	  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ
//	  TCP[ESTABLISHED]   19       127.0.0.1 40080       10.0.2.15    80     0     0
//	  TCP[HOST_FORWARD]   9       127.0.0.1 40080       10.0.2.15    80     0     0
func usernetState(out string, fwdPort, dstPort int) (state string, found bool) {
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		n := len(f)
		if n < 7 || !strings.HasPrefix(f[0], "TCP[") || !strings.HasSuffix(f[0], "]") {
			continue
		}
		// Count columns from the end: the FD column may be empty.
		sp, err1 := strconv.Atoi(f[n-5])
		dp, err2 := strconv.Atoi(f[n-3])
		st := strings.TrimSuffix(strings.TrimPrefix(f[0], "TCP["), "]")
		if err1 != nil || err2 != nil || sp != fwdPort || dp != dstPort || st == "HOST_FORWARD" {
			continue
		}
		if st == "ESTABLISHED" {
			return st, true
		}
		state, found = st, true
	}
	return state, found
}
