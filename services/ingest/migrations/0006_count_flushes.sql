-- Each write of the in-memory outcome counts has an id, recorded with it in one transaction, so
-- that a write retried after an error that hid its commit (a connection lost before the reply)
-- adds nothing twice. Purged hourly after a day: only a replica's retries look an id up.
CREATE TABLE ingest_count_flushes (
    flush_id   uuid        PRIMARY KEY,
    flushed_at timestamptz NOT NULL DEFAULT now()
);
