-- Keys that a database distributed by customer (Citus) can keep (docs/scaling.md#citus), and
-- that PostgreSQL's hash partitioning by customer needs: every key of a table kept by customer
-- includes customer_id.
--
-- An event id stays unique across all customers, as the merge's idempotency needs (a redelivery
-- is a no-op, another event under a merged id a conflict), in a table of its own keyed by the id.
-- events' key becomes (customer_id, occurred_at, event_id): it is also the order every read by
-- customer wants, so it replaces events_customer_newest_idx (scanned backward for newest first)
-- and an event still costs two index entries, now one here and one in event_ids.
--
-- On a large events table this builds its new key under an exclusive lock: plan the upgrade's
-- window by the table's size (8 s for a million events, 470 MB, on a 2-core machine; the
-- profile service merges nothing meanwhile, ingest keeps accepting into the event log).

-- A profile change waiting in the outbox keeps its event (the relay read it from events by its
-- id): events are found by customer now, and a merge may move the event before it is published.
ALTER TABLE profile_change_outbox ADD COLUMN event_type text, ADD COLUMN body bytea, ADD COLUMN log_position bigint;
UPDATE profile_change_outbox o SET event_type = e.event_type, body = e.body, log_position = e.log_position
FROM events e WHERE e.event_id = o.event_id;

CREATE TABLE event_ids (
    event_id text PRIMARY KEY
);
INSERT INTO event_ids (event_id) SELECT event_id FROM events;

ALTER TABLE events DROP CONSTRAINT events_pkey;
ALTER TABLE events ADD CONSTRAINT events_pkey PRIMARY KEY (customer_id, occurred_at, event_id);
DROP INDEX events_customer_newest_idx;

-- An identifier is found by its value (the merge resolves events by it), so it is kept by its
-- value, not by customer; a key to customers would tie the two together. The merge moves
-- identifiers to their survivor and an erasure deletes them, explicitly.
ALTER TABLE identifiers DROP CONSTRAINT identifiers_customer_id_fkey;
