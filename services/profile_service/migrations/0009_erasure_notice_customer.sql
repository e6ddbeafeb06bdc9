-- The erased customer's id in the erasure notice (ErasureNotice.customer_id): services that keep
-- data by customer id (triggers) cannot match identifier hashes. '' for rows written before.
ALTER TABLE erasure_notice_outbox ADD COLUMN customer_id text NOT NULL DEFAULT '';
