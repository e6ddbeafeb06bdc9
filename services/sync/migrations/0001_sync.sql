-- The sync service's own tables (prefixed: it may share a database with other services).
-- docs/connectors.md describes them.

-- One row per connector: where its pull has got to and how its runs went. ``cursor`` is the
-- connector's own position (HubSpot: the newest lastmodifieddate handed on), written only once
-- ingest has acknowledged every event of the page that reached it.
CREATE TABLE sync_connectors (
    connector_id         text        PRIMARY KEY,
    cursor               jsonb,
    cursor_saved_at      timestamptz,
    last_run_started_at  timestamptz,
    last_success_at      timestamptz,
    last_failure_at      timestamptz,
    last_error           text        NOT NULL DEFAULT '',
    consecutive_failures integer     NOT NULL DEFAULT 0,
    records_total        bigint      NOT NULL DEFAULT 0,  -- provider records read
    events_total         bigint      NOT NULL DEFAULT 0,  -- events ingest answered (any answer)
    rejected_total       bigint      NOT NULL DEFAULT 0,  -- of those, refused (REJECTED, CONFLICT)
    next_run_at          timestamptz
);
