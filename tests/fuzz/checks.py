"""What must hold of any mapped delivery, whatever went in."""

from __future__ import annotations

from datetime import UTC, datetime

from ingest.envelope import business_key, stamp
from ingest.validation import ValidationRules, validate_event
from ingest.webhook_mapping import ITEM_REASONS, ItemOutcome, MappedDelivery, item_identifiers, quarantine_id
from sendtime_common import json_input
from sendtime_common.event_integrity import identifier_hashes
from sendtime_common.identifiers import IdentifierHasher

NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)
RULES = ValidationRules()
HASHER = IdentifierHasher.unkeyed()


def check_delivery(delivery: MappedDelivery) -> None:
    """No item failed to map (that is a bug), every event goes through ingest's first steps
    without raising, and every unmapped item can be dead-lettered."""
    for item in delivery.items:
        assert item.outcome != ItemOutcome.FAILED, repr(item.error)
        assert (item.outcome == ItemOutcome.MAPPED) == bool(item.events)
        for event in item.events:
            event.SerializeToString()
            stamped = stamp(event, NOW)
            validate_event(stamped, NOW, RULES)
            business_key(stamped)
            identifier_hashes(stamped, HASHER)
        if item.outcome in ITEM_REASONS:
            assert item.problem
            quarantine_id(delivery.provider, item.type, item.raw)
            json_input.parse_json(json_input.dumps(item.raw))
            item_identifiers(delivery.provider, item.raw).SerializeToString()
