-- The progress of a recovery plan's (or replication group's) failback past
-- its switch: written in the same transaction as the machines' switch
-- (store.SwitchFailovers), then after each group powered on and each
-- action done, so a server restarted after the switch goes on with the
-- remaining groups in order, with their actions, in the same job.
-- data is the server's JSON (versioned): the set's groups and actions as
-- they were at the failback, its members by group and the next step.
-- A row goes when its failback has ended.

CREATE TABLE plan_failbacks (
    job_id     TEXT PRIMARY KEY,
    subject    TEXT NOT NULL,               -- "plan P" or "group G"
    data       TEXT NOT NULL,
    updated_at INTEGER NOT NULL             -- Unix ns
);
