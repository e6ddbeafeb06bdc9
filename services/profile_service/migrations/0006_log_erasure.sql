-- Where each merged event sits in the event log, so that erasing a person erases its raw copy
-- there too; and the positions an erasure (or a late event of an erased person) left to erase
-- from the log, taken out by profile_service.erasure_outbox once the log confirms.
ALTER TABLE events ADD COLUMN log_position bigint;
CREATE TABLE log_erasure_outbox (
    log_position bigint PRIMARY KEY,
    added_at timestamptz NOT NULL DEFAULT now()
);
