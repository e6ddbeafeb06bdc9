-- The hashes of the identifiers a dead letter names, so an erasure notice (which names a person
-- by the same hashes) deletes the person's dead letters. Dead letters stored before this
-- migration have none; they go with their retention (INGEST_DEAD_LETTER_RETENTION_DAYS).
ALTER TABLE ingest_rejected_events ADD COLUMN identifier_hashes bytea[] NOT NULL DEFAULT '{}';
CREATE INDEX ingest_rejected_events_identifiers ON ingest_rejected_events USING gin (identifier_hashes);
