-- A customer's state (~4 KB of JSON) is written whole on every merge and read whole, never
-- queried inside. jsonb parsed it on every write and turned it back into text on every read, and
-- pglz compressed it: json keeps the text as sent, and lz4 compresses several times faster.
-- Measured on PostgreSQL 15, 400-row batches of 3.9 KB states: UPDATE 50 -> 14 µs a row, reading
-- the state 18 -> 5 µs a row (docs/benchmarks.md).
-- lz4 needs a PostgreSQL built with it (--with-lz4), as the Debian packages and the official
-- Docker images are; elsewhere this migration fails before changing anything.
-- One statement, so that the rewrite compresses existing states with lz4 too (SET COMPRESSION
-- alone applies to new values only, and a type change after it resets it). The rewrite holds an
-- ACCESS EXCLUSIVE lock: with millions of customers, run it in a quiet hour; merges wait for it.
ALTER TABLE customers
    ALTER COLUMN state TYPE json USING state::json,
    ALTER COLUMN state SET COMPRESSION lz4;
