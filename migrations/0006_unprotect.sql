-- The end of a machine's protection (asr unprotect): when it was
-- unprotected, and whether its replica is to be deleted too. The mark is
-- written before anything is removed, so that a removal cut short is
-- finished at the next start or by the next unprotect.

ALTER TABLE machines ADD COLUMN unprotected_at INTEGER NOT NULL DEFAULT 0;  -- Unix ns; 0 = protected
ALTER TABLE machines ADD COLUMN delete_replica INTEGER NOT NULL DEFAULT 0;  -- 1: the replica, its points and the row go too
