-- Profile changes waiting to be published on the event log's profile change stream
-- (sendtime.profile.v1.ProfileChange; docs/profiles.md#profile-change-notices): one row per
-- event merged, written by the merge's own transaction and deleted once the log has it
-- (profile_service.change_outbox), so none is published before its merge commits and none is
-- lost between the commit and the publish (a crash, NATS down).
--
-- id is the change's sequence: a customer's merges serialize on its locks, taken before this
-- insert, so one customer's rows get increasing ids in commit order; they are published in id
-- order. The change's id (its message id on the stream, whose duplicate window drops a resend)
-- is made of id and customer_id, so that another database (or a restored one) publishing on the
-- same stream does not reuse one; a random uuid column cost twice this insert (gen_random_uuid).
-- customer_id is the customer as the merge left it; an erasure deletes the rows of the person
-- (their customer id and the ids merged into it). The event itself is read from events when
-- published, so a merge writes only this small row. No index but the key: the table is near
-- empty while NATS is up, and an index would be one more write per merged event.
CREATE TABLE profile_change_outbox (
    id                  bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer_id         uuid        NOT NULL,
    event_id            text,                   -- NULL: a merge of customers no event caused
    profile_version     bigint      NOT NULL,   -- the customer's version after the merge
    merged_customer_ids uuid[]      NOT NULL DEFAULT '{}',
    merged_at           timestamptz NOT NULL DEFAULT now()
);
