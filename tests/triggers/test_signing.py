"""Standard Webhooks signatures, checked with the standardwebhooks library receivers use."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta, timezone

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from triggers.signing import (
    InvalidSecret,
    SigningKeys,
    new_signing_secret,
    new_webhook_id,
    secret_bytes,
    signature_headers,
)

BODY = b'{"event":"cart_abandoned","items":[{"sku":"S-1","name":"Caf\xc3\xa9"}]}'


def verifies(secret: str, headers: dict[str, str], body: bytes = BODY) -> bool:
    try:
        Webhook(secret).verify(body, headers)
    except WebhookVerificationError:
        return False
    return True


@pytest.mark.parametrize("size", [24, 32, 64])
def test_a_new_secret_is_whsec_and_the_base64_of_its_random_bytes(size: int) -> None:
    secret = new_signing_secret(size)
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == size
    assert secret_bytes(secret) == base64.b64decode(secret.removeprefix("whsec_"))


def test_new_secrets_differ() -> None:
    assert len({new_signing_secret() for _ in range(100)}) == 100


@pytest.mark.parametrize("size", [0, 16, 23, 65])
def test_a_secret_size_outside_the_spec_is_refused(size: int) -> None:
    with pytest.raises(ValueError):
        new_signing_secret(size)


@pytest.mark.parametrize(
    "secret",
    [
        "",
        base64.b64encode(bytes(32)).decode(),  # no prefix
        "whsec_" + base64.b64encode(bytes(16)).decode(),  # too short
        "whsec_" + base64.b64encode(bytes(65)).decode(),  # too long
        "whsec_not*base64!",
        "whsec_" + base64.b64encode(bytes(32)).decode()[:-4] + " xyz",
    ],
)
def test_a_malformed_secret_is_refused(secret: str) -> None:
    with pytest.raises(InvalidSecret):
        SigningKeys(secret)


def test_webhook_ids_are_msg_and_sort_as_their_times() -> None:
    start = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
    ids = [new_webhook_id(start + timedelta(milliseconds=i)) for i in range(0, 5000, 7)]
    assert all(i.startswith("msg_") and len(i) == 30 for i in ids)
    assert ids == sorted(ids)
    assert len({new_webhook_id(start) for _ in range(1000)}) == 1000


def test_the_headers_verify_with_standardwebhooks() -> None:
    secret = new_signing_secret()
    now = datetime.now(UTC)
    headers = signature_headers(SigningKeys(secret), "msg_1", BODY, now)
    assert headers["webhook-id"] == "msg_1"
    assert headers["webhook-timestamp"] == str(int(now.timestamp()))
    assert headers["webhook-signature"].startswith("v1,")
    assert " " not in headers["webhook-signature"]
    assert verifies(secret, headers)
    assert Webhook(secret).verify(BODY, headers) == {
        "event": "cart_abandoned",
        "items": [{"sku": "S-1", "name": "Café"}],
    }


def test_a_changed_body_id_or_secret_does_not_verify() -> None:
    secret = new_signing_secret()
    headers = signature_headers(SigningKeys(secret), "msg_1", BODY, datetime.now(UTC))
    assert not verifies(secret, headers, BODY.replace(b"S-1", b"S-2"))
    assert not verifies(secret, headers | {"webhook-id": "msg_2"})
    assert not verifies(new_signing_secret(), headers)


def test_the_timestamp_is_the_instant_whatever_the_time_zone() -> None:
    secret = new_signing_secret()
    berlin = datetime.now(UTC).astimezone(timezone(timedelta(hours=1)))
    headers = signature_headers(SigningKeys(secret), "msg_1", BODY, berlin)
    assert headers["webhook-timestamp"] == str(int(berlin.timestamp()))
    assert verifies(secret, headers)


def test_an_old_timestamp_is_refused_by_receivers() -> None:
    secret = new_signing_secret()
    headers = signature_headers(SigningKeys(secret), "msg_1", BODY, datetime.now(UTC) - timedelta(minutes=6))
    assert not verifies(secret, headers)


def test_during_a_rotation_both_secrets_verify_until_the_previous_one_expires() -> None:
    old, new = new_signing_secret(), new_signing_secret()
    now = datetime.now(UTC)
    keys = SigningKeys(old).rotated(new, timedelta(hours=24), now)
    assert keys.previous_expire_time == now + timedelta(hours=24)

    during = signature_headers(keys, "msg_1", BODY, now)
    assert len(during["webhook-signature"].split(" ")) == 2
    assert verifies(old, during)
    assert verifies(new, during)

    # Past the expiry (the receiver's clock moved with it: a fresh timestamp is what it sees).
    expired = SigningKeys(new, old, now - timedelta(seconds=1))
    after = signature_headers(expired, "msg_1", BODY, now)
    assert len(after["webhook-signature"].split(" ")) == 1
    assert verifies(new, after)
    assert not verifies(old, after)


def test_the_previous_secret_stops_at_its_expiry_exactly() -> None:
    old, new = new_signing_secret(), new_signing_secret()
    expiry = datetime(2026, 12, 5, 8, 0, tzinfo=UTC)
    keys = SigningKeys(new, old, expiry)
    assert keys.in_use(expiry - timedelta(microseconds=1)) == (new, old)
    assert keys.in_use(expiry) == (new,)


def test_a_rotation_with_no_overlap_signs_with_the_new_secret_alone() -> None:
    old, new = new_signing_secret(), new_signing_secret()
    keys = SigningKeys(old).rotated(new, timedelta(0), datetime.now(UTC))
    assert keys == SigningKeys(new)


def test_a_second_rotation_drops_the_oldest_secret() -> None:
    first, second, third = new_signing_secret(), new_signing_secret(), new_signing_secret()
    now = datetime.now(UTC)
    keys = SigningKeys(first).rotated(second, timedelta(hours=1), now).rotated(third, timedelta(hours=1), now)
    assert keys.in_use(now) == (third, second)


def test_a_previous_secret_needs_an_expiry() -> None:
    with pytest.raises(ValueError):
        SigningKeys(new_signing_secret(), new_signing_secret())


def test_secrets_stay_out_of_reprs() -> None:
    secret = new_signing_secret()
    assert secret.removeprefix("whsec_") not in repr(SigningKeys(secret))
