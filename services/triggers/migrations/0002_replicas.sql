-- The running replicas' heartbeats (triggers.replicas): a replica whose row lapsed died, and
-- what it held (claimed episodes, leased deliveries) is handed back at once instead of when
-- each lease ends.
CREATE TABLE triggers_replicas (
    owner       text        PRIMARY KEY,
    alive_until timestamptz NOT NULL,  -- PostgreSQL's clock: replicas' clocks may differ
    started_at  timestamptz NOT NULL DEFAULT now()
);
-- A lapsed replica's claims, found without reading every waiting episode.
CREATE INDEX triggers_episodes_claimed ON triggers_episodes (claimed_by) WHERE claimed_by IS NOT NULL;
