-- The alerts' outbox (server/outbox.go): a notice is sent at least once and,
-- once sent, never again, across restarts. notified_at is when the raise
-- was told (0: not yet), notified_severity the severity last told (an
-- escalation is due while it differs from severity), resolve_notified_at
-- when the resolve was told. Rows from before this migration count as told.

ALTER TABLE alerts ADD COLUMN notified_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE alerts ADD COLUMN notified_severity TEXT NOT NULL DEFAULT '';
ALTER TABLE alerts ADD COLUMN resolve_notified_at INTEGER NOT NULL DEFAULT 0;
UPDATE alerts SET notified_at = raised, notified_severity = severity,
    resolve_notified_at = CASE WHEN state = 'resolved' THEN resolved ELSE 0 END;
-- What the last scrub found, for the alerts (scrub_result is display
-- text): '' (none), ok, damaged, failed.
ALTER TABLE machines ADD COLUMN scrub_outcome TEXT NOT NULL DEFAULT '';
UPDATE machines SET scrub_outcome = CASE
    WHEN scrub_result LIKE 'failed%' THEN 'failed'
    WHEN scrub_result LIKE '%damaged blocks%' THEN 'damaged'
    WHEN scrub_result != '' THEN 'ok' ELSE '' END;
-- The notices still to send.
CREATE INDEX alerts_unsent ON alerts (id)
    WHERE (state = 'active' AND (notified_at = 0 OR notified_severity != severity))
       OR (state = 'resolved' AND resolve_notified_at = 0);
-- Alerts(all): the active first (the critical first, then newest first),
-- then the resolved, the latest resolved first.
CREATE INDEX alerts_listing ON alerts (state = 'active' DESC, (state = 'active' AND severity = 'critical') DESC, resolved DESC, id DESC);
-- Pruning of old resolved alerts and a machine's deletion.
CREATE INDEX alerts_resolved ON alerts (resolved) WHERE state = 'resolved';
CREATE INDEX alerts_machine ON alerts (machine_id);
