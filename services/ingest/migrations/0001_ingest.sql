-- Ingest's own tables (prefixed: ingest may share a database with other services).

-- Event ids ingest has stored in the event log, kept for the dedup window (INGEST_DEDUP_WINDOW_HOURS)
-- so a resend after the event log's short duplicate window is still a duplicate.
CREATE TABLE ingest_processed_events (
    event_id    text        PRIMARY KEY,
    received_at timestamptz NOT NULL
);
CREATE INDEX ingest_processed_events_received_at ON ingest_processed_events (received_at);

-- Business facts that must count once whatever their event id (an order, a refund). An event
-- claims its key before it is published ('pending') and confirms it once stored ('stored'); a
-- pending claim older than the publish timeout was abandoned and may be taken over.
CREATE TABLE ingest_business_keys (
    key_kind   text        NOT NULL,
    key_value  text        NOT NULL,
    event_id   text        NOT NULL,
    stored     boolean     NOT NULL DEFAULT false,
    claimed_at timestamptz NOT NULL,
    PRIMARY KEY (key_kind, key_value)
);

-- The dead-letter store: rejected events as received, with why.
CREATE TABLE ingest_rejected_events (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    text        NOT NULL,
    source      int         NOT NULL,
    event       bytea       NOT NULL,   -- sendtime.ingest.v1.Event
    status      bytea       NOT NULL,   -- google.rpc.Status with BadRequest
    rejected_at timestamptz NOT NULL,
    replayed_at timestamptz
);
CREATE INDEX ingest_rejected_events_newest ON ingest_rejected_events (rejected_at DESC, id DESC);

-- Outcome counts per UTC day, source, outcome and duplicate kind (0 when not a duplicate).
CREATE TABLE ingest_counts (
    day            date   NOT NULL,
    source         int    NOT NULL,
    outcome        int    NOT NULL,
    duplicate_kind int    NOT NULL,
    count          bigint NOT NULL,
    PRIMARY KEY (day, source, outcome, duplicate_kind)
);
