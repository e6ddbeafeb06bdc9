-- Erasure notices waiting to be published on the event log. A notice is written in the
-- erasure's own transaction and deleted once the log has it, so none is lost between the commit
-- and the publish (a crash, NATS down); a resend is harmless.
CREATE TABLE erasure_notice_outbox (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    identifier_hashes bytea[]     NOT NULL,
    erased_at         timestamptz NOT NULL
);
