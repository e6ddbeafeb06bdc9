-- The merger's dead letters: events of the event log it did not merge, with why. A poison event
-- (one it can never store or merge) is set aside here at once instead of being redelivered for
-- ever; an idempotency conflict (an event id merged before, with another payload) is kept here
-- for review. ListUnmergedEvents lists them, ReplayUnmergedEvent merges one again.
CREATE TABLE unmerged_events (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    payload           bytea       NOT NULL,  -- the message as the log held it (an Event, or not)
    log_position      bigint,                -- its stream sequence; NULL when unknown
    delivery_count    int         NOT NULL,
    status            bytea       NOT NULL,  -- google.rpc.Status with an ErrorInfo reason
    -- The hashes of the identifiers it names, so that erasing a person deletes it (and erases
    -- its copy in the log); an undecodable one names nobody and goes with its retention.
    identifier_hashes bytea[]     NOT NULL DEFAULT '{}',
    created_at        timestamptz NOT NULL DEFAULT now(),
    replayed_at       timestamptz
);
-- A redelivery of a message set aside already (its ack lost) finds its row.
CREATE UNIQUE INDEX unmerged_events_log_position ON unmerged_events (log_position);
CREATE INDEX unmerged_events_newest ON unmerged_events (created_at DESC, id DESC);
CREATE INDEX unmerged_events_identifiers ON unmerged_events USING gin (identifier_hashes);
