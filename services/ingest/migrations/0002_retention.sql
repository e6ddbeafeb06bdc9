-- Business keys are purged once no event ingest still accepts could repeat them (claimed longer
-- ago than INGEST_MAX_EVENT_AGE_DAYS); the purge finds them by claim time.
CREATE INDEX ingest_business_keys_claimed_at ON ingest_business_keys (claimed_at);
