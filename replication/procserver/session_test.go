package procserver

import (
	"strings"
	"testing"

	"github.com/asrdr/asr/replication"
)

// TestJoinLog: how an agent's log joins what the server holds, from its
// Hello, the catalog's log and the durable seq (docs/PROTOCOL.md, Session).
func TestJoinLog(t *testing.T) {
	for _, tc := range []struct {
		name    string
		h       replication.Hello
		cat     replication.MachineCatalog
		durable uint64
		want    logJoin
		err     string
	}{
		{"first connection", replication.Hello{LogID: logA, SpoolFirst: 1, NextSeq: 1}, replication.MachineCatalog{}, 0, joinGoesOn, ""},
		{"the same log goes on", replication.Hello{LogID: logA, SpoolFirst: 3, NextSeq: 9}, replication.MachineCatalog{LogID: logA}, 5, joinGoesOn, ""},
		{"spool all acknowledged", replication.Hello{LogID: logA, SpoolFirst: 6, NextSeq: 6}, replication.MachineCatalog{LogID: logA}, 5, joinGoesOn, ""},
		{"sequence gap", replication.Hello{LogID: logA, SpoolFirst: 10, NextSeq: 12}, replication.MachineCatalog{LogID: logA}, 5, joinGap, ""},
		{"gap with nothing held", replication.Hello{LogID: logA, SpoolFirst: 10, NextSeq: 12}, replication.MachineCatalog{}, 0, joinGap, ""},
		{"agent behind the server", replication.Hello{LogID: logA, SpoolFirst: 1, NextSeq: 4}, replication.MachineCatalog{LogID: logA}, 5, 0, "lost its state"},
		{"agent behind, recovering", replication.Hello{LogID: logA, SpoolFirst: 1, NextSeq: 4, Recovering: true}, replication.MachineCatalog{LogID: logA}, 5, joinGoesOn, ""},
		{"another log id", replication.Hello{LogID: logB, SpoolFirst: 1, NextSeq: 40}, replication.MachineCatalog{LogID: logA}, 5, joinNewLog, ""},
		{"another log id, nothing held", replication.Hello{LogID: logB, SpoolFirst: 1, NextSeq: 40}, replication.MachineCatalog{LogID: logA}, 0, joinGoesOn, ""},
		{"log ended", replication.Hello{LogID: logA, SpoolFirst: 1, NextSeq: 40}, replication.MachineCatalog{LogID: logA, LogEnded: "re-registered"}, 5, joinNewLog, ""},
		{"new-log welcome lost", replication.Hello{LogID: logB, SpoolFirst: 1, NextSeq: 40}, replication.MachineCatalog{LogID: logB, LogStart: 6}, 5, joinNewLog, ""},
		{"new-log welcome applied", replication.Hello{LogID: logB, SpoolFirst: 6, NextSeq: 8}, replication.MachineCatalog{LogID: logB, LogStart: 6}, 5, joinGoesOn, ""},
		{"legacy agent", replication.Hello{SpoolFirst: 3, NextSeq: 9}, replication.MachineCatalog{}, 5, joinGoesOn, ""},
		{"legacy agent after the log ended", replication.Hello{SpoolFirst: 1, NextSeq: 9}, replication.MachineCatalog{LogEnded: "re-registered"}, 5, 0, "upgrade the agent"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := joinLog(&tc.h, &tc.cat, tc.durable)
			switch {
			case tc.err != "":
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("joinLog = %v, %v; want an error with %q", got, err, tc.err)
				}
			case err != nil || got != tc.want:
				t.Fatalf("joinLog = %v, %v; want %v", got, err, tc.want)
			}
		})
	}
}
