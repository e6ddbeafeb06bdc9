-- Customers, their identifiers, and every event merged into them.
--
-- The profile itself is a JSON document (customers.state) computed from the customer's events by
-- profile_service.state; events are kept so that an out-of-order event, or a merge of two
-- customers, recomputes the state from history instead of guessing.

CREATE TABLE customers (
    customer_id uuid PRIMARY KEY,
    version     bigint      NOT NULL,
    state       jsonb       NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE identifiers (
    kind        text        NOT NULL,
    value       text        NOT NULL,
    customer_id uuid        NOT NULL REFERENCES customers ON DELETE CASCADE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, value)
);
CREATE INDEX identifiers_customer_idx ON identifiers (customer_id);

-- Also the record of processed event ids: a redelivered event finds its row and changes nothing.
CREATE TABLE events (
    event_id    text        PRIMARY KEY,
    customer_id uuid        NOT NULL REFERENCES customers ON DELETE CASCADE,
    event_type  text        NOT NULL,
    occurred_at timestamptz NOT NULL,
    body        bytea       NOT NULL,  -- the sendtime.ingest.v1.Event as received
    merged_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_customer_time_idx ON events (customer_id, occurred_at);
