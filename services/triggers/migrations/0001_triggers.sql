-- The triggers service's own tables (prefixed: it may share a database with other services).
-- docs/triggers-storage.md describes them, the claim protocol and erasure.

-- Definitions ----------------------------------------------------------------------------------

-- One row per trigger. ``content`` is the Trigger without its output-only fields (name, state,
-- times, etag): those are columns. ``etag`` changes with every write (a new random value, so a
-- trigger deleted and created again under the same id does not match an etag read before).
CREATE TABLE triggers_triggers (
    id         text        PRIMARY KEY,
    content    bytea       NOT NULL,   -- sendtime.triggers.v1.Trigger
    state      smallint    NOT NULL CHECK (state IN (1, 2)),  -- TriggerState: ACTIVE, PAUSED
    etag       text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per destination. ``content`` is the Destination without its output-only fields.
-- ``signing_keys`` holds a webhook's secrets sealed with the service's key (AES-256-GCM, the
-- destination id as associated data; triggers/secret_box.py): no read but the one the
-- dispatcher makes (DestinationStore.signing_keys) selects it. Health is what the delivery log
-- keeps of the attempts: the last success, and when the failures since began.
CREATE TABLE triggers_destinations (
    id                   text        PRIMARY KEY,
    kind                 text        NOT NULL CHECK (kind IN ('webhook', 'subscription')),
    content              bytea       NOT NULL,   -- sendtime.triggers.v1.Destination
    state                smallint    NOT NULL CHECK (state IN (1, 2)),  -- ENABLED, DISABLED
    disabled_reason      text        NOT NULL DEFAULT '',
    signing_keys         bytea,      -- sealed; webhooks only
    previous_secret_expire_time timestamptz,  -- during a rotation (not secret: shown in reads)
    last_success_time    timestamptz,
    failing_since        timestamptz,
    etag                 text        NOT NULL,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    CHECK ((kind = 'webhook') = (signing_keys IS NOT NULL))
);

-- Episodes -------------------------------------------------------------------------------------

-- At most one record per (customer, trigger, key); a new episode replaces a closed one. Every
-- write adds 1 to ``version``, and every write but the first is conditional on the version the
-- writer read: a decision is applied only to the episode it was taken on (no lost update
-- between the event consumer and the firer, nor between two firers).
--
-- ``due_at`` is when a firer may next claim a WAITING episode: fire_at plus the trigger's
-- allowed lateness, a decision's wake_at, 'infinity' while its trigger is paused, or, while a
-- firer holds a claim (``claimed_by``), the end of that claim's lease.
CREATE TABLE triggers_episodes (
    customer_id   text        NOT NULL,
    trigger_id    text        NOT NULL REFERENCES triggers_triggers (id) ON DELETE CASCADE,
    episode_key   text        NOT NULL,
    state         text        NOT NULL CHECK (state IN ('waiting', 'fired', 'exited', 'ended')),
    opened_at     timestamptz NOT NULL,
    last_entry_at timestamptz NOT NULL,
    fire_at       timestamptz NOT NULL,
    due_at        timestamptz,
    closed_at     timestamptz,
    close_reason  text        NOT NULL DEFAULT '',  -- episodes.Reason of the close
    version       bigint      NOT NULL DEFAULT 1,
    claimed_by    text,
    claimed_at    timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, trigger_id, episode_key),
    CHECK ((state = 'waiting') = (due_at IS NOT NULL AND closed_at IS NULL)),
    CHECK (state = 'waiting' OR claimed_by IS NULL)
);
-- What the firers poll: waiting episodes by the time they may be claimed.
CREATE INDEX triggers_episodes_due ON triggers_episodes (due_at) WHERE state = 'waiting';
-- A trigger's episodes: DeleteTrigger (and its cascade), ResumeTrigger's parked ones.
CREATE INDEX triggers_episodes_by_trigger ON triggers_episodes (trigger_id, state);

-- When exits of a trigger occurred for a customer, as they arrived (whatever they ended), for
-- entries that arrive after the exits that follow them (episodes.on_event's known_exits).
-- ``exit_key`` '' is an exit without a key (it ends every episode of the customer); a keyed
-- exit's key is never '' (an empty value ends nothing). Bounded: the newest few times per row.
CREATE TABLE triggers_known_exits (
    customer_id      text          NOT NULL,
    trigger_id       text          NOT NULL REFERENCES triggers_triggers (id) ON DELETE CASCADE,
    exit_key         text          NOT NULL,
    occurred_at      timestamptz[] NOT NULL,  -- newest first
    last_occurred_at timestamptz   NOT NULL,  -- the newest, for purging
    PRIMARY KEY (customer_id, trigger_id, exit_key)
);
CREATE INDEX triggers_known_exits_last ON triggers_known_exits (last_occurred_at);
CREATE INDEX triggers_known_exits_by_trigger ON triggers_known_exits (trigger_id);  -- the cascade

-- Every fire: the cooldown (a trigger's last fire for the customer) and the frequency cap (the
-- customer's fires of every trigger in a window). Kept when the trigger is deleted (the cap
-- counts them still); purged after the longest window.
CREATE TABLE triggers_fires (
    customer_id text        NOT NULL,
    trigger_id  text        NOT NULL,
    fired_at    timestamptz NOT NULL,
    episode_key text        NOT NULL,
    PRIMARY KEY (customer_id, trigger_id, fired_at, episode_key)
);
-- "The fires of this customer since t".
CREATE INDEX triggers_fires_customer_time ON triggers_fires (customer_id, fired_at);
CREATE INDEX triggers_fires_time ON triggers_fires (fired_at);

-- A fence per customer: every fire adds 1 to ``fire_sequence``, conditional on the value the
-- firer read with the fires it decided on. Two fires for one customer decided on the same
-- facts (two triggers under one cap, two keys of one trigger in a cooldown) cannot both commit.
CREATE TABLE triggers_customer_fires (
    customer_id   text   PRIMARY KEY,
    fire_sequence bigint NOT NULL
);

-- Deliveries -----------------------------------------------------------------------------------

-- One fire's delivery to one destination. ``state``: 1 PENDING, 2 DELIVERED, 3 FAILED
-- (DeliveryState). ``available_at``: when a dispatcher (webhooks) or a subscription stream may
-- take a pending delivery: at ``next_attempt_time`` while nobody holds it; while one does
-- (``claimed_by``), the end of its lease. For a subscription, ``next_attempt_time`` is when it
-- is sent (again): at once, then the ack deadline after each send.
CREATE TABLE triggers_deliveries (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    destination_id    text        NOT NULL REFERENCES triggers_destinations (id) ON DELETE CASCADE,
    kind              text        NOT NULL CHECK (kind IN ('webhook', 'subscription')),
    webhook_id        text        NOT NULL UNIQUE,
    trigger_id        text        NOT NULL,
    customer_id       text        NOT NULL,
    episode_key       text        NOT NULL,
    fired_at          timestamptz NOT NULL,
    state             smallint    NOT NULL CHECK (state IN (1, 2, 3)),
    failure_reason    text        NOT NULL DEFAULT '',
    payload           jsonb       NOT NULL,
    attempts          integer     NOT NULL DEFAULT 0,
    next_attempt_time timestamptz,
    available_at      timestamptz,
    claimed_by        text,
    sent_at           timestamptz,  -- subscriptions: last sent on a stream
    send_count        integer     NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL,
    -- One delivery per destination per fire, whatever the firer does.
    UNIQUE (customer_id, trigger_id, episode_key, fired_at, destination_id),
    CHECK ((state = 1) = (available_at IS NOT NULL))
);
-- The dispatchers' sweep: pending webhook deliveries by when they may be taken.
CREATE INDEX triggers_deliveries_available ON triggers_deliveries (available_at)
    WHERE state = 1 AND kind = 'webhook';
-- A dispatcher's own (renewing its leases).
CREATE INDEX triggers_deliveries_claimed ON triggers_deliveries (claimed_by) WHERE state = 1;
-- ListDeliveries, newest first, with or without a state; a subscription's pending ones in order.
CREATE INDEX triggers_deliveries_by_destination
    ON triggers_deliveries (destination_id, created_at DESC, id DESC);
CREATE INDEX triggers_deliveries_by_destination_state
    ON triggers_deliveries (destination_id, state, created_at DESC, id DESC);

-- Every attempt of a webhook delivery, numbered from 1.
CREATE TABLE triggers_delivery_attempts (
    delivery_id bigint      NOT NULL REFERENCES triggers_deliveries (id) ON DELETE CASCADE,
    attempt     integer     NOT NULL,
    start_time  timestamptz NOT NULL,
    latency     interval    NOT NULL,
    http_status integer     NOT NULL,
    error       text        NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
