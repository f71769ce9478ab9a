-- Replication policies (ASR's replication policy, with its failback twin),
-- their assignment to machines, replication groups, and events.

CREATE TABLE policies (
    name            TEXT PRIMARY KEY,
    rpo_threshold   INTEGER NOT NULL,  -- ns; crossing it raises an event
    retention       INTEGER NOT NULL,  -- ns; how far back points are kept
    app_frequency   INTEGER NOT NULL,  -- ns; 0 = no application-consistent points
    crash_interval  INTEGER NOT NULL,  -- ns
    pit_window      INTEGER NOT NULL,  -- ns; any-point-in-time window
    failback_of     TEXT NOT NULL DEFAULT '',  -- set on a failback policy: its replication policy
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);

ALTER TABLE machines ADD COLUMN policy TEXT NOT NULL DEFAULT 'default';
ALTER TABLE machines ADD COLUMN group_name TEXT NOT NULL DEFAULT '';

CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    time       INTEGER NOT NULL,   -- Unix ns
    machine_id TEXT NOT NULL DEFAULT '',
    severity   TEXT NOT NULL,      -- info | warning | error
    kind       TEXT NOT NULL,      -- rpo-exceeded, rpo-recovered, freeze-failed, ...
    message    TEXT NOT NULL
);
CREATE INDEX events_machine_time ON events (machine_id, time);
