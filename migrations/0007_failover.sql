-- Recovery: failovers (test and real) with the point they hold and where
-- the recovered machine runs, recovery plans, and jobs' results (the lines
-- a failover prints, the measured RTO) and manual actions waiting for an
-- operator.

CREATE TABLE failovers (
    id          TEXT PRIMARY KEY,             -- 16 hex chars
    machine_id  TEXT NOT NULL,
    kind        TEXT NOT NULL,                -- test | failover
    dest        TEXT NOT NULL,                -- nbd | qemu | vsphere | azure
    state       TEXT NOT NULL,                -- starting | active | committed | failed
    point_seq   INTEGER NOT NULL,             -- the point it recovers (held against retention)
    point_id    TEXT NOT NULL,
    at_time     INTEGER NOT NULL DEFAULT 0,   -- Unix ns of --time (0: the point itself)
    plan        TEXT NOT NULL DEFAULT '',     -- the recovery plan that started it
    job_id      TEXT NOT NULL DEFAULT '',
    detail      TEXT NOT NULL DEFAULT '{}',   -- JSON: exports, the created VM's references
    created_at  INTEGER NOT NULL,             -- Unix ns
    ended_at    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX failovers_machine ON failovers(machine_id, state);

CREATE TABLE plans (
    name        TEXT PRIMARY KEY,
    data        TEXT NOT NULL,                -- JSON: ordered groups, members, actions, drill schedule
    created_at  INTEGER NOT NULL,
    last_drill  INTEGER NOT NULL DEFAULT 0    -- Unix ns of the last scheduled drill
);

ALTER TABLE jobs ADD COLUMN output TEXT NOT NULL DEFAULT '[]';   -- JSON list of result lines
ALTER TABLE jobs ADD COLUMN rto_ns INTEGER NOT NULL DEFAULT 0;   -- measured time to a usable machine
ALTER TABLE jobs ADD COLUMN waiting TEXT NOT NULL DEFAULT '';    -- a manual action waiting for confirmation
