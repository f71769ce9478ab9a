-- Resyncs: one row per disk that needs (or is having) a resync.

CREATE TABLE resyncs (
    machine_id   TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    disk_idx     INTEGER NOT NULL,
    reason       TEXT NOT NULL,
    ranges       TEXT NOT NULL DEFAULT '',     -- JSON [{off, len}]; '' = the whole disk
    manual       INTEGER NOT NULL DEFAULT 0,   -- requested by an operator: runs at once
    state        TEXT NOT NULL,                -- scheduled | running | failed
    job_id       INTEGER NOT NULL DEFAULT 0,
    requested_at INTEGER NOT NULL,             -- Unix ns
    next_try     INTEGER NOT NULL DEFAULT 0,   -- Unix ns; 0 = as soon as allowed
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT NOT NULL DEFAULT '',
    started_at   INTEGER NOT NULL DEFAULT 0,
    total        INTEGER NOT NULL DEFAULT 0,
    compared     INTEGER NOT NULL DEFAULT 0,
    sent         INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (machine_id, disk_idx)
);

-- A policy's resync window ('' = the vault's, setting resync_window).
ALTER TABLE policies ADD COLUMN resync_window TEXT NOT NULL DEFAULT '';
