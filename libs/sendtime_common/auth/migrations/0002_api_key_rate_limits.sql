-- A key's own rate limits, each replacing its scope's default rate for that key:
-- {"<scope>": {"per_second": <calls a second>, "burst": <calls at once>}}; {} for none.
ALTER TABLE api_keys ADD COLUMN IF NOT EXISTS rate_limits jsonb NOT NULL DEFAULT '{}';
