-- What has been pushed: per destination and customer, the newest profile version pushed (or
-- refused by the provider, which is final too). services/sync/push.py. The customer key names
-- a person: erasure deletes their rows.
CREATE TABLE sync_push_ledger (
    destination    text        NOT NULL,
    customer_key   text        NOT NULL,
    pushed_version bigint      NOT NULL,
    refused_reason text        NOT NULL DEFAULT '',
    pushed_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (destination, customer_key)
);
