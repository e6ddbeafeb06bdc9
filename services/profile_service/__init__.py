"""Profile resolution: stitches identifiers into customers, merges events into profiles kept in
PostgreSQL, keeps a coherent Redis hot cache, and serves profiles over gRPC."""
