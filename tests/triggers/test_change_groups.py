"""How a batch of profile changes is split for applying side by side (change_consumer.
customer_groups): one customer's changes in order, and a merge ordered with the merged
customers' changes."""

from __future__ import annotations

from typing import Any

from sendtime.profile.v1 import profile_pb2
from triggers.change_consumer import customer_groups


def changes(*specs: tuple[str, tuple[str, ...]]) -> list[tuple[Any, profile_pb2.ProfileChange]]:
    return [
        (
            n,
            profile_pb2.ProfileChange(
                change_id=str(n), customer_id=customer, merged_customer_ids=list(merged)
            ),
        )
        for n, (customer, merged) in enumerate(specs)
    ]


def test_customers_apart_are_groups_of_their_own_each_in_order() -> None:
    groups = customer_groups(changes(("a", ()), ("b", ()), ("a", ()), ("c", ())))
    assert [[c.change_id for _, c in group] for group in groups] == [["0", "2"], ["1"], ["3"]]


def test_a_merge_joins_the_merged_customers_changes_in_batch_order() -> None:
    # x's change comes before the merge of x into a; y's (merged too) after it.
    batch = changes(("x", ()), ("b", ()), ("a", ("x", "y")), ("y", ()), ("a", ()))
    groups = customer_groups(batch)
    assert sorted([c.change_id for _, c in group] for group in groups) == [["0", "2", "3", "4"], ["1"]]
