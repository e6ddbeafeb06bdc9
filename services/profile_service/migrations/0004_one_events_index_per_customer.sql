-- events_customer_newest_idx (customer_id, occurred_at DESC, event_id DESC) serves every query by
-- customer, oldest first too (scanned backward), so the older (customer_id, occurred_at) index
-- only cost a second index update on every merged event.
DROP INDEX IF EXISTS events_customer_time_idx;
