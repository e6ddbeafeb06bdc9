"""The header parsers of both signatures under arbitrary headers: verified, or a
WebhookSignatureError (a 401), never another exception. Header values may hold lone
surrogates: aiohttp decodes header bytes that are not UTF-8 with 'surrogateescape'."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ingest.webhook_mapping import (
    SENDGRID_SIGNATURE_HEADER,
    SENDGRID_TIMESTAMP_HEADER,
    SHOPIFY_HMAC_HEADER,
    WebhookSignatureError,
    load_sendgrid_public_key,
    shopify_hmac,
    verify_sendgrid_signature,
    verify_shopify_signature,
)
from tests.fuzz.conftest import fuzzing
from tests.fuzz.strategies import any_text

KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_KEY = load_sendgrid_public_key(
    base64.b64encode(
        KEY.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    ).decode()
)
NOW = datetime(2026, 11, 24, 12, tzinfo=UTC)
header_values = (
    any_text
    | st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode())
    | st.integers(-(10**13), 10**13).map(str)
)
header_names = st.sampled_from(
    [SHOPIFY_HMAC_HEADER, SENDGRID_SIGNATURE_HEADER, SENDGRID_TIMESTAMP_HEADER]
).map(lambda name: name.lower()) | st.sampled_from(
    [SHOPIFY_HMAC_HEADER, SENDGRID_SIGNATURE_HEADER, SENDGRID_TIMESTAMP_HEADER]
)
headers = st.dictionaries(header_names, header_values, max_size=3)


@settings(fuzzing())
@given(headers, st.binary(max_size=64))
@example({SHOPIFY_HMAC_HEADER: "\udcff"}, b"{}")  # a header byte that is not UTF-8
@example({"x-shopify-hmac-sha256": "\ud800"}, b"")
@example({SHOPIFY_HMAC_HEADER: "é"}, b"{}")
def test_shopify_signature_headers(given_headers: dict[str, str], body: bytes) -> None:
    try:
        verify_shopify_signature("secret", given_headers, body)
    except WebhookSignatureError:
        return
    assert given_headers[SHOPIFY_HMAC_HEADER].strip() == shopify_hmac("secret", body)


@settings(fuzzing())
@given(headers, st.binary(max_size=64))
@example({SENDGRID_SIGNATURE_HEADER: "\udcff", SENDGRID_TIMESTAMP_HEADER: "1"}, b"[]")
@example({SENDGRID_SIGNATURE_HEADER: "AAAA", SENDGRID_TIMESTAMP_HEADER: "١٢"}, b"[]")
def test_sendgrid_signature_headers(given_headers: dict[str, str], body: bytes) -> None:
    try:
        verify_sendgrid_signature(PUBLIC_KEY, given_headers, body, NOW, timedelta(minutes=5))
    except WebhookSignatureError:
        return
    raise AssertionError("a signature no one made verified")
