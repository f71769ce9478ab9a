-- Verify jobs (an operator's compare of the source with the replica's
-- contents read back) and scrubs (the replica checked against its block
-- checksums).

ALTER TABLE resyncs ADD COLUMN verify INTEGER NOT NULL DEFAULT 0;    -- the job is a verify
ALTER TABLE machines ADD COLUMN last_scrub INTEGER NOT NULL DEFAULT 0;    -- Unix ns of the last scrub
ALTER TABLE machines ADD COLUMN scrub_result TEXT NOT NULL DEFAULT '';   -- what it found, for the console
