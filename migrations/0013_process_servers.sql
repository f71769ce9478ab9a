-- Scale-out process servers (asr process-server) registered with this
-- configuration server. A registration holds the serial of the client
-- certificate it was issued (a re-registration under the same name revokes
-- the old one) and the data address its agents connect to. Heartbeats and
-- figures are kept in memory only (no write per heartbeat).

CREATE TABLE process_servers (
    name        TEXT PRIMARY KEY,
    cert_serial TEXT NOT NULL,
    data_addr   TEXT NOT NULL,
    registered  INTEGER NOT NULL                -- Unix ns
);

-- The process server each machine is assigned to; a machine without a row
-- is the configuration server's built-in one's.
CREATE TABLE ps_assignments (
    machine_id     TEXT PRIMARY KEY REFERENCES machines(id) ON DELETE CASCADE,
    process_server TEXT NOT NULL REFERENCES process_servers(name)
);
