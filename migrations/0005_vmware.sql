-- VMware: registered vCenters (credentials sealed with the vault's data
-- key), the VM inventory their discovery keeps, the BIOS UUID each agent
-- reports (how a machine is linked to its VM), and jobs (push installs and
-- other long operations, with their steps).

CREATE TABLE vcenters (
    name        TEXT PRIMARY KEY,
    url         TEXT NOT NULL,
    username    TEXT NOT NULL,
    secret      BLOB NOT NULL,              -- the password, sealed (replication.SealedCodec)
    thumbprint  TEXT NOT NULL,              -- pinned SHA-256 of the server certificate
    added_at    INTEGER NOT NULL,           -- Unix seconds
    connected   INTEGER NOT NULL DEFAULT 0, -- discovery's last state
    last_update INTEGER NOT NULL DEFAULT 0, -- Unix ns of the last inventory change or check
    last_error  TEXT NOT NULL DEFAULT '',
    about       TEXT NOT NULL DEFAULT ''
);

CREATE TABLE vms (
    vcenter    TEXT NOT NULL REFERENCES vcenters(name) ON DELETE CASCADE,
    ref        TEXT NOT NULL,               -- managed object id (vm-42)
    name       TEXT NOT NULL,
    bios_uuid  TEXT NOT NULL,               -- config.uuid, lower case
    data       TEXT NOT NULL,               -- the whole vmware.VM as JSON
    stale      INTEGER NOT NULL DEFAULT 0,  -- the vCenter is unreachable: last known
    updated_at INTEGER NOT NULL,            -- Unix ns
    PRIMARY KEY (vcenter, ref)
);
CREATE INDEX vms_bios_uuid ON vms(bios_uuid);

ALTER TABLE machines ADD COLUMN bios_uuid TEXT NOT NULL DEFAULT '';  -- as the agent reports it, lower case
ALTER TABLE machines ADD COLUMN disk_modes TEXT NOT NULL DEFAULT '';  -- JSON {disk name: nbd|scan} as the agent reports them

CREATE TABLE jobs (
    id         TEXT PRIMARY KEY,            -- 16 hex chars
    kind       TEXT NOT NULL,               -- protect | unprotect
    subject    TEXT NOT NULL,               -- what it works on (vcenter/vm)
    state      TEXT NOT NULL,               -- running | succeeded | failed
    steps      TEXT NOT NULL DEFAULT '[]',  -- JSON list of steps
    error      TEXT NOT NULL DEFAULT '',
    started_at INTEGER NOT NULL,            -- Unix ns
    ended_at   INTEGER NOT NULL DEFAULT 0
);
