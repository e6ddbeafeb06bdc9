-- API keys (only a hash of each) and the audit trail of privileged calls. Every service reads
-- the keys; the profile service (KeyService) and `sendtime keys` write them.
CREATE TABLE IF NOT EXISTS api_keys (
    key_id text PRIMARY KEY,
    secret_hash bytea NOT NULL,
    display_name text NOT NULL,
    scopes text[] NOT NULL,
    creator text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,
    revoked_at timestamptz,
    last_used_at timestamptz,
    rotated_from text REFERENCES api_keys (key_id)
);
CREATE INDEX IF NOT EXISTS api_keys_by_creation ON api_keys (created_at DESC, key_id DESC);

-- One row, bumped in the transaction of every change to api_keys: replicas poll it (a one-row
-- read) and reload the keys only when it moved. A timestamp column would not do: a change
-- committed late with an early timestamp would be missed.
CREATE TABLE IF NOT EXISTS api_key_generation (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    generation bigint NOT NULL
);
INSERT INTO api_key_generation (generation) VALUES (1) ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS audit_events (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    service text NOT NULL,
    principal text NOT NULL,
    method text NOT NULL,
    target text NOT NULL,
    outcome text NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_events_newest_first ON audit_events (at DESC, id DESC);
