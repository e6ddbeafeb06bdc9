-- A fingerprint of each stored event (SHA-256 of the event as its sender meant it, 16 bytes:
-- sendtime_common.event_integrity), so that a later event under the same id is told apart: the
-- same fingerprint is a resend (DUPLICATE), another one an idempotency conflict (CONFLICT, kept in
-- the dead-letter store for review). NULL for ids stored before this migration, and for ids ingest
-- derived from the content: those conflict with nothing.
ALTER TABLE ingest_processed_events ADD COLUMN fingerprint bytea;
