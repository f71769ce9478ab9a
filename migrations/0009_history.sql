-- History for the console's charts: one sample a minute per machine of its
-- RPO and the bytes received so far (the churn is the difference between
-- two samples). Pruned past 25 hours by the server's history loop.

CREATE TABLE history (
    machine_id  TEXT NOT NULL REFERENCES machines(id) ON DELETE CASCADE,
    time        INTEGER NOT NULL,             -- Unix ns
    rpo_ns      INTEGER NOT NULL,             -- -1: not known
    bytes       INTEGER NOT NULL,             -- bytes received from the machine so far
    PRIMARY KEY (machine_id, time)
) WITHOUT ROWID;

CREATE INDEX history_time ON history (time);
