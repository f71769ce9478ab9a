-- Alerts (server/alerts.go): one row per raise of a condition on a subject;
-- while it is active no other active row has the same (kind, subject_key).
-- Notification settings are JSON in the settings table (notify_email,
-- notify_webhook), the SMTP password sealed with the vault's data key.

CREATE TABLE alerts (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind        TEXT NOT NULL,               -- rpo, agent-heartbeat, ps-cpu, ...
    subject_key TEXT NOT NULL,               -- what it is about, as the engine keys it (machine id, machine id/disk, ...)
    severity    TEXT NOT NULL,               -- warning | critical
    state       TEXT NOT NULL,               -- active | resolved
    machine_id  TEXT NOT NULL DEFAULT '',
    machine     TEXT NOT NULL DEFAULT '',    -- the machine's name when raised
    disk        TEXT NOT NULL DEFAULT '',
    subject     TEXT NOT NULL DEFAULT '',
    message     TEXT NOT NULL,
    action      TEXT NOT NULL,
    raised      INTEGER NOT NULL,            -- Unix ns
    updated     INTEGER NOT NULL,            -- Unix ns
    resolved    INTEGER NOT NULL DEFAULT 0,  -- Unix ns, 0 while active
    acked       INTEGER NOT NULL DEFAULT 0   -- Unix ns, 0: not acknowledged
);
CREATE UNIQUE INDEX alerts_one_active ON alerts (kind, subject_key) WHERE state = 'active';
CREATE INDEX alerts_state ON alerts (state, id);
