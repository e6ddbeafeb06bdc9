"""`sendtime triggers`: the ready-made triggers created in the served triggers service, as an
operator runs the command (its own event loop, the key from the environment)."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest

from sendtime.triggers.v1 import triggers_pb2, triggers_pb2_grpc
from sendtime_cli import __main__ as cli
from sendtime_cli.triggers import SUMMARIES, duration
from tests.triggers.service_support import new_subscription
from tests.triggers.store_support import unique
from triggers.server import TriggersApp


def run_cli(argv: list[str], key: str, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("SENDTIME_API_KEY", key)
    return cli.main(argv)


async def test_a_ready_made_cart_reminder_takes_one_command(
    triggers_app: TriggersApp,
    admin_key: str,
    destination_stub: triggers_pb2_grpc.DestinationServiceAsyncStub,
    trigger_stub: triggers_pb2_grpc.TriggerServiceAsyncStub,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    destination = await new_subscription(destination_stub)
    trigger_id = unique("cart")
    argv = [
        *("triggers", "create", "cart-abandoned", "--destination", destination.name, "--id", trigger_id),
        *("--delay", "30m", "--plaintext", "--target", f"127.0.0.1:{triggers_app.grpc.port}"),
    ]
    code = await asyncio.to_thread(run_cli, argv, admin_key, monkeypatch)
    assert code == 0, capsys.readouterr().err
    printed = json.loads(capsys.readouterr().out)
    assert printed["name"] == f"triggers/{trigger_id}"

    stored = (
        await trigger_stub.GetTrigger(triggers_pb2.GetTriggerRequest(name=f"triggers/{trigger_id}"))
    ).trigger
    assert stored.entry.event_type == "cart_item_added"
    assert stored.delay.after.ToTimedelta() == timedelta(minutes=30)
    assert stored.cooldown.ToTimedelta() == timedelta(hours=12)  # the ready-made one's
    assert list(stored.delivery.destinations) == [destination.name]
    assert stored.state == triggers_pb2.TRIGGER_STATE_ACTIVE


async def test_a_refused_trigger_prints_the_field_violations_and_exits_1(
    triggers_app: TriggersApp,
    admin_key: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = [
        *("triggers", "create", "order-completed", "--destination", "destinations/nowhere"),
        *("--id", unique("order"), "--plaintext", "--target", f"127.0.0.1:{triggers_app.grpc.port}"),
    ]
    assert await asyncio.to_thread(run_cli, argv, admin_key, monkeypatch) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "INVALID_ARGUMENT: the trigger delivers to destinations that do not exist",
        "  trigger.delivery.destinations[0]: destinations/nowhere does not exist",
    ]


def test_without_a_key_it_says_which_to_set(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("SENDTIME_API_KEY", raising=False)
    monkeypatch.delenv("SENDTIME_API_KEY_FILE", raising=False)
    assert cli.main(["triggers", "create", "cart-abandoned", "--destination", "destinations/x"]) == 1
    assert "triggers.write" in capsys.readouterr().err


def test_the_list_names_the_three_and_durations_read_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["triggers", "ready-made"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == list(SUMMARIES)
    assert duration("90s") == timedelta(seconds=90) and duration("7d") == timedelta(days=7)
    with pytest.raises(Exception, match="not a duration"):
        duration("1.5h")
