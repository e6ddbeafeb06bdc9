-- Push connectors (services/sync/push.py). The profile change stream marks each changed customer
-- pending for every push destination; a push run reads their live profiles, pushes what changed
-- and deletes the marks it settled. A mark names a person: erasure deletes it.
CREATE TABLE sync_push_pending (
    destination     text        NOT NULL,
    customer_key    text        NOT NULL,
    profile_version bigint      NOT NULL,  -- the newest change's; a push at or past it settles the mark
    changed_at      timestamptz NOT NULL,  -- the oldest change not yet pushed: the push's lag
    PRIMARY KEY (destination, customer_key)
);

-- The values pushed (a digest), so that a change to traits a destination does not take is not
-- pushed again with the same values.
ALTER TABLE sync_push_ledger ADD COLUMN attributes_digest bytea;

ALTER TABLE sync_connectors
    ADD COLUMN items_pushed_total  bigint NOT NULL DEFAULT 0,
    ADD COLUMN items_refused_total bigint NOT NULL DEFAULT 0;
