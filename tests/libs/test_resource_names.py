"""Numeric resource names, as ingest's and profile's dead letters use them."""

from __future__ import annotations

import grpc
import pytest

from sendtime.ingest.v1 import ingest_pb2, ingest_pb2_grpc
from sendtime_common.errors import FieldViolation, field_violations, status_of
from sendtime_common.resource_names import InvalidName, numeric_id


def test_a_numeric_name_gives_its_id_and_any_other_shape_is_refused() -> None:
    assert numeric_id("rejectedEvents/42", "rejectedEvents/") == 42
    assert numeric_id("rejectedEvents/" + "9" * 18, "rejectedEvents/") == 10**18 - 1
    for bad in [
        "42",
        "rejectedEvents/",
        "rejectedEvents/x1",
        "rejectedEvents/-1",
        "rejectedEvents/" + "9" * 19,
    ]:
        with pytest.raises(InvalidName, match="must look like rejectedEvents/123"):
            numeric_id(bad, "rejectedEvents/")


async def test_an_id_past_a_bigint_is_invalid_argument_not_a_database_error(
    ingest_stub: ingest_pb2_grpc.IngestServiceAsyncStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await ingest_stub.ReplayRejectedEvent(
            ingest_pb2.ReplayRejectedEventRequest(name="rejectedEvents/" + "9" * 20)
        )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = status_of(refused.value)
    assert status is not None
    assert field_violations(status) == [FieldViolation("name", "must look like rejectedEvents/123")]
