-- Merge records, merges refused by identity limits, erasure tombstones, and event listing.

-- A customer merged into another: the survivor keeps the record (who, by which event, when).
CREATE TABLE merges (
    survivor_id        uuid        NOT NULL REFERENCES customers ON DELETE CASCADE,
    merged_customer_id uuid        NOT NULL,
    event_id           text        NOT NULL,
    merged_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX merges_survivor_idx ON merges (survivor_id, merged_at);

-- A merge (or a new identifier) an identity limit refused.
CREATE TABLE blocked_merges (
    customer_id       uuid        NOT NULL REFERENCES customers ON DELETE CASCADE,
    other_customer_id uuid,
    event_id          text        NOT NULL,
    reason            text        NOT NULL,
    blocked_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX blocked_merges_customer_idx ON blocked_merges (customer_id, blocked_at);

-- Erased identifiers, as SHA-256 of "kind:value" (the values themselves are erased): an event
-- for one of them that occurred before the erasure is a late event of the erased person, and
-- is dropped.
CREATE TABLE erasure_tombstones (
    identifier_hash bytea       PRIMARY KEY,
    erased_at       timestamptz NOT NULL
);

-- ListProfileEvents pages newest first.
CREATE INDEX events_customer_newest_idx ON events (customer_id, occurred_at DESC, event_id DESC);
