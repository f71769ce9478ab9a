-- The vault: settings, registered machines and their disks, recovery points
-- (mirrored from the target's catalog for the console), sessions.

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE machines (
    id            TEXT PRIMARY KEY,          -- 32 hex chars, also the client certificate's CN
    name          TEXT NOT NULL UNIQUE,
    cert_serial   TEXT NOT NULL,             -- serial of the only valid client certificate
    registered_at INTEGER NOT NULL,          -- Unix seconds
    last_seen     INTEGER NOT NULL DEFAULT 0,
    agent_version TEXT NOT NULL DEFAULT '',
    bytes_received INTEGER NOT NULL DEFAULT 0, -- payload bytes received over the data listener, all time
    last_error    TEXT NOT NULL DEFAULT ''
);

CREATE TABLE disks (
    machine_id  TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    idx         INTEGER NOT NULL,
    name        TEXT NOT NULL,
    size        INTEGER NOT NULL,
    state       TEXT NOT NULL DEFAULT 'initial',  -- initial | protected | resync
    cursor      INTEGER NOT NULL DEFAULT 0,       -- initial replication: bytes read and applied
    reason      TEXT NOT NULL DEFAULT '',          -- why a resync is needed
    PRIMARY KEY (machine_id, idx),
    UNIQUE (machine_id, name)
);

CREATE TABLE points (
    machine_id TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    seq        INTEGER NOT NULL,
    time       INTEGER NOT NULL,   -- Unix ns, agent clock
    kind       TEXT NOT NULL,      -- crash | app
    PRIMARY KEY (machine_id, seq)
);

CREATE TABLE sessions (
    id         TEXT PRIMARY KEY,   -- hex of a SHA-256 of the cookie value
    csrf       TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);
