-- A webhook item that could not be mapped to events (a type Sendtime does not map, a malformed
-- item) is a dead letter too, kept as received: a sendtime.ingest.v1.WebhookItem. Its event_id
-- is a digest of the item, unique among such dead letters, so a provider's redelivery of the same
-- item finds the dead letter it already has instead of adding another.
ALTER TABLE ingest_rejected_events ADD COLUMN webhook_item bytea;
CREATE UNIQUE INDEX ingest_rejected_events_webhook_item
    ON ingest_rejected_events (event_id) WHERE webhook_item IS NOT NULL;
