"""The profile service's Prometheus metrics (docs/operations.md): merge batches, how fresh a
merged event is when it becomes visible, where reads are answered from, and events set aside
unmerged."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds from an event to its profile being readable: the SLO is p99 under 1 s from the log's
# acknowledgement; events sent late (imports, a device back online) are hours old.
FRESHNESS_BUCKETS = (
    *(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0),
    *(30.0, 60.0, 300.0, 3600.0, 86400.0),
)

MERGE_BATCH_EVENTS = Histogram(
    "sendtime_profile_merge_batch_events",
    "Events in one merge batch (one transaction).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
MERGE_BATCH_SECONDS = Histogram(
    "sendtime_profile_merge_batch_seconds",
    "Time to merge one batch (its transaction, retries included).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
VISIBLE_AFTER_STORED = Histogram(
    "sendtime_profile_freshness_from_stored_seconds",
    "From the event log storing an event (just before ingest acknowledged it) to its merge"
    " being readable (committed, the cache refreshed).",
    buckets=FRESHNESS_BUCKETS,
)
VISIBLE_AFTER_OCCURRED = Histogram(
    "sendtime_profile_freshness_from_occurred_seconds",
    "From an event's occurred_at (corrected for the sender's clock) to its merge being readable.",
    buckets=FRESHNESS_BUCKETS,
)
READS = Counter(
    "sendtime_profile_reads_total",
    "Profiles looked up, by where the answer came from: near (this replica's copy), redis,"
    " database, or missing (no such customer).",
    ["source"],
)
READ_FROM_NEAR = READS.labels("near")
READ_FROM_REDIS = READS.labels("redis")
READ_FROM_DATABASE = READS.labels("database")
READ_MISSING = READS.labels("missing")

UNMERGED = Counter(
    "sendtime_profile_unmerged_events_total",
    "Events the merger set aside unmerged (ListUnmergedEvents shows them), by reason:"
    " EVENT_UNDECODABLE, UNSTORABLE_VALUE, MERGE_FAILED or a conflict.",
    ["reason"],
)

MERGE_LANES_OWNED = Gauge(
    "sendtime_profile_merge_lanes_owned",
    "Lanes of the event stream (partitions, and the unpartitioned one) this replica merges now;"
    " across replicas they add up to the lanes (profile_service.merge_lanes).",
)
