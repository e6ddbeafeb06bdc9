"""Hypothesis strategies for outside input: JSON values as ``json_input.parse_json`` returns
them, and provider payloads shaped enough like the real ones that mapping goes deep, with any
JSON value in any field."""

from __future__ import annotations

import string
from datetime import timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from ingest.webhook_mapping import SENDGRID_IGNORED_TYPES, SHOPIFY_TOPICS
from sendtime_common.json_input import INT_MAX, INT_MIN, MAX_NUMBER_CHARS

SENDGRID_TYPES = sorted(
    {"delivered", "open", "click", "bounce", "unsubscribe", "group_unsubscribe", "spamreport"}
    | SENDGRID_IGNORED_TYPES
    | {"machine_open", "Open", ""}
)
TOPICS = sorted(SHOPIFY_TOPICS)

# Text with lone surrogates too: aiohttp decodes header bytes that are not UTF-8 into them
# ('surrogateescape'), and Python's json keeps a \ud800 escape as one.
any_text = st.text(st.characters() | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=30)
# What a string parse_json returns may hold: no NUL, surrogate or noncharacter (Cn also holds the
# unassigned code points, which do no harm to leave out).
json_text = st.text(st.characters(exclude_categories=("Cs", "Cn"), exclude_characters="\x00"), max_size=30)
json_numbers = (
    st.integers(INT_MIN, INT_MAX)
    | st.decimals(allow_nan=False, allow_infinity=False, min_value=-(10**30), max_value=10**30).filter(
        lambda d: len(str(d)) <= MAX_NUMBER_CHARS  # parse_json refuses longer ones
    )
    | st.sampled_from(
        [Decimal("1E+300"), Decimal("-1.7976931348623157E+308"), Decimal("5E-324"), Decimal("0E-10")]
    )
)
json_scalars = st.none() | st.booleans() | json_numbers | json_text
json_values: st.SearchStrategy[Any] = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(json_text, children, max_size=4),
    max_leaves=20,
)


def maybe(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly a plausible value, sometimes any JSON value."""
    return st.one_of(plausible, plausible, json_values)


ids = st.integers(0, INT_MAX) | st.text(
    string.ascii_letters + string.digits + "._:-", min_size=1, max_size=24
)
times = st.builds(
    lambda at, minutes: at.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(),
    st.datetimes(),
    st.integers(-23 * 60, 23 * 60),
) | st.sampled_from(
    ["2026-11-24T07:15:03-05:00", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "yesterday"]
)
amounts = (
    st.decimals(min_value=-(10**6), max_value=10**6, places=2).map(str)
    | st.from_regex(r"-?[0-9]{1,22}(\.[0-9]{0,12})?([eE][-+]?[0-9]{1,7})?", fullmatch=True)
    | json_numbers
)
currencies = st.sampled_from(["USD", "EUR", "JPY", "BHD", "DEM", "XTS", "usd", ""]) | json_text.map(
    lambda t: t[:4]
)
emails = st.emails() | json_text
urls = (
    st.sampled_from(["https://shop.example.com/p?q=1", "javascript:alert(1)", "http://[::1", ""]) | json_text
)


def optional(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional={name: maybe(value) for name, value in fields.items()})


line_items = optional(
    sku=json_text,
    variant_id=ids,
    name=json_text,
    title=json_text,
    quantity=st.integers(INT_MIN, INT_MAX),
    price=amounts,
)
transactions = optional(
    kind=st.sampled_from(["refund", "sale"]),
    status=st.sampled_from(["success", "failure", "error"]),
    amount=amounts,
    currency=currencies,
)
refunds = optional(
    id=ids,
    order_id=ids,
    processed_at=times,
    created_at=times,
    transactions=st.lists(transactions, max_size=3),
)
shopify_resources = optional(
    id=ids,
    token=ids,
    order_id=ids,
    email=emails,
    contact_email=emails,
    customer=optional(id=ids, email=emails),
    created_at=times,
    processed_at=times,
    updated_at=times,
    cancelled_at=times,
    cancel_reason=json_text,
    currency=currencies,
    presentment_currency=currencies,
    total_price=amounts,
    line_items=st.lists(line_items, max_size=3),
    refunds=st.lists(refunds, max_size=2),
    transactions=st.lists(transactions, max_size=3),
)
sendgrid_items = (
    optional(
        event=st.sampled_from(SENDGRID_TYPES),
        email=emails,
        timestamp=st.integers(-(2**40), 2**40) | json_numbers,
        sg_event_id=ids | json_text,
        sg_message_id=json_text,
        campaign_id=json_values,
        url=urls,
        type=st.sampled_from(["bounce", "blocked", "expired"]),
        reason=json_text,
        ip=st.ip_addresses().map(str) | json_text,
        useragent=json_text,
    )
    | json_values
)
