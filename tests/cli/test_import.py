"""`sendtime import` against a real ingest (on real NATS) and profile service."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import signal
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import nats
import nats.js.errors
import pytest

import devstack
from ingest.server import IngestApp
from profile_service.settings import Settings as ProfileSettings
from sendtime.profile.v1 import profile_pb2_grpc
from sendtime_cli.checkpoint import Checkpoint
from sendtime_cli.checkpoint import default_path as checkpoint_path
from sendtime_cli.formats import Format
from sendtime_cli.importer import ImportOptions, run_import
from sendtime_common.event_log import JetStreamSettings
from sendtime_common.tls import ClientTls
from tests.conftest import eventually, repo_root, user, wait_for_profile

OCCURRED_AT = (datetime.now(UTC) - timedelta(hours=1)).replace(microsecond=0)


def identify_line(user_id: str, **traits: object) -> str:
    return json.dumps(
        {
            "customer": {"userId": user_id},
            "occurredAt": OCCURRED_AT.isoformat().replace("+00:00", "Z"),
            "identify": {"traits": traits},
        }
    )


async def run(options: ImportOptions) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await run_import(options, out=out, err=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def target(ingest_app: IngestApp) -> str:
    return f"127.0.0.1:{ingest_app.grpc.port}"


@pytest.fixture
def importing(target: str, admin_key: str) -> Callable[..., ImportOptions]:
    """ImportOptions for the test's ingest, with a key."""
    return functools.partial(ImportOptions, target=target, api_key=admin_key, tls=ClientTls(plaintext=True))


async def test_import_jsonl_reports_rejected_lines_and_reruns_safely(
    tmp_path: Path,
    importing: Callable[..., ImportOptions],
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(
        "\n".join(
            [
                identify_line(f"imp-{unique}-1", plan="pro"),
                "{not json",
                identify_line(f"imp-{unique}-2", plan="free"),
                # No customer: ingest rejects it.
                '{"identify": {"traits": {"plan": "x"}}, "occurredAt": "2026-01-01T00:00:00Z"}',
                "",
                identify_line(f"imp-{unique}-3", plan="team"),
            ]
        )
        + "\n"
    )
    rejected_out = tmp_path / "rejected.jsonl"
    options = importing(path=path, quiet=True, rejected_out=rejected_out)

    code, out, _ = await run(options)

    assert code == 2, out
    assert "accepted   3" in out and "rejected   2" in out
    assert "line 2: invalid JSON: Expecting property name enclosed in double quotes" in out
    assert (
        "line 4: customer: at least one of user_id, email, anonymous_id, crm_id, device_id is required" in out
    )
    written = [json.loads(line) for line in rejected_out.read_text().splitlines()]
    assert [(r["line"], r["raw"]) for r in written] == [
        (2, "{not json"),
        (4, path.read_text().splitlines()[3]),
    ]
    for suffix, plan in (("1", "pro"), ("2", "free"), ("3", "team")):
        profile = await wait_for_profile(
            profile_stub, user(f"imp-{unique}-{suffix}"), lambda p: "plan" in p.traits
        )
        assert profile.traits["plan"] == plan

    # Again: the import is complete, so nothing is sent.
    code, out, err = await run(options)
    assert code == 2 and "already imported completely" in err and "accepted   3" in out

    # With --restart everything is sent again and comes back DUPLICATE (the bad lines still rejected).
    code, out, _ = await run(replace(options, restart=True))
    assert code == 2
    assert "accepted   0" in out and "duplicate  3" in out and "rejected   2" in out
    assert len(rejected_out.read_text().splitlines()) == 2


async def test_a_line_reusing_a_stored_event_id_for_another_event_is_a_rejected_line(
    tmp_path: Path, importing: Callable[..., ImportOptions], unique: str
) -> None:
    # It stopped the whole import before ("ingest answered EVENT_OUTCOME_CONFLICT").
    lines = [
        json.loads(identify_line(f"imp-{unique}", plan=plan)) | {"eventId": f"imp-{unique}"}
        for plan in ("pro", "free")
    ]
    path = tmp_path / "reused.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))

    code, out, _ = await run(importing(path=path, quiet=True))

    assert code == 2, out
    assert "accepted   1" in out and "rejected   1" in out
    assert "line 2: an event with this id was stored before with another payload" in out


async def test_all_good_lines_exit_0_and_show_rejected_limits_the_list(
    tmp_path: Path, importing: Callable[..., ImportOptions], unique: str
) -> None:
    good = tmp_path / "good.ndjson"
    good.write_text(identify_line(f"imp-{unique}-ok", plan="pro") + "\n")
    code, out, _ = await run(importing(path=good, quiet=True))
    assert code == 0 and "accepted   1" in out and "rejected" in out

    bad = tmp_path / "bad.jsonl"
    bad.write_text("nope\n" * 5)
    code, out, _ = await run(importing(path=bad, quiet=True, show_rejected=2))
    assert code == 2
    assert "line 1: invalid JSON" in out and "line 2: invalid JSON" in out and "line 3:" not in out
    assert "... and 3 more" in out


async def test_traits_csv_import_reaches_the_profile(
    tmp_path: Path,
    importing: Callable[..., ImportOptions],
    profile_stub: profile_pb2_grpc.ProfileServiceAsyncStub,
    unique: str,
) -> None:
    path = tmp_path / "traits.csv"
    path.write_text(f"user_id,email,plan,vip\nimp-{unique}-csv,,gold,true\n,,silver,\n")
    code, out, _ = await run(importing(path=path, quiet=True, typed=True))
    assert code == 2
    assert "line 3: customer: at least one of" in out
    profile = await wait_for_profile(profile_stub, user(f"imp-{unique}-csv"), lambda p: "vip" in p.traits)
    assert profile.traits["plan"] == "gold" and profile.traits["vip"] is True


async def test_a_changed_file_is_not_resumed_without_restart(
    tmp_path: Path, importing: Callable[..., ImportOptions], unique: str
) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(identify_line(f"imp-{unique}-c", plan="a") + "\n")
    options = importing(path=path, quiet=True)
    assert (await run(options))[0] == 0

    path.write_text(
        identify_line(f"imp-{unique}-c", plan="a") + "\n" + identify_line(f"imp-{unique}-d", plan="b") + "\n"
    )
    code, out, err = await run(options)
    assert code == 1 and out == ""
    assert "the file changed since the checkpoint was written" in err and "--restart" in err

    code, out, _ = await run(replace(options, restart=True))
    assert code == 0 and "accepted   1" in out and "duplicate  1" in out


async def test_unreachable_ingest_exits_1_saying_how_to_resume(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text(identify_line("u-1", plan="a") + "\n")
    options = ImportOptions(
        path=path, target=f"127.0.0.1:{devstack.free_port()}", quiet=True, retry_for_s=0.3
    )
    code, _, err = await run(options)
    assert code == 1
    assert "UNAVAILABLE" in err and "run the same command again" in err


async def _stream_state(nats_url: str) -> tuple[int, int]:
    """(messages stored in the event log, messages the profile merger has not acked yet)."""
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        stored = int((await js.stream_info(JetStreamSettings().stream)).state.messages)
        try:
            consumer = await js.consumer_info(JetStreamSettings().stream, ProfileSettings().consumer_name)
            unmerged = int(consumer.num_pending) + int(consumer.num_ack_pending)
        except nats.js.errors.NotFoundError:  # no profile service in this run
            unmerged = 0
        return stored, unmerged
    finally:
        await client.close()


async def test_killed_import_resumes_and_stores_every_good_line_once(
    tmp_path: Path, target: str, admin_key: str, nats_url: str, unique: str
) -> None:
    # A catalog: product_upserted events, which the profile merger skips cheaply, so the thousands
    # of events do not hold up the tests after this one.
    rows, bad = ["sku,name,price,currency,in_stock"], 0
    for i in range(3000):
        price = "12;50" if i % 100 == 7 else f"{i}.{i % 100:02d}"  # the bad ones rejected locally
        currency = "EURO" if i % 100 == 8 else "EUR"  # ... and by ingest
        bad += price == "12;50" or currency == "EURO"
        rows.append(f"{unique}-{i},Product {i},{price},{currency},{i % 2}")
    path = tmp_path / "catalog.csv"
    path.write_text("\n".join(rows) + "\n")
    lines, good = len(rows) - 1, len(rows) - 1 - bad
    checkpoint_file = checkpoint_path(path)
    command = [str(repo_root() / "bin" / "sendtime"), "import", str(path), "--format", "catalog-csv"]
    command += ["--target", target, "--plaintext", "--batch-size", "50", "--rate", "4000", "--quiet"]
    before, _ = await _stream_state(nats_url)

    env = {**os.environ, "SENDTIME_API_KEY": admin_key}
    first = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, env=env)
    deadline = asyncio.get_running_loop().time() + 60  # a loaded machine starts the CLI slowly
    while True:
        checkpoint = Checkpoint.load(checkpoint_file) if checkpoint_file.exists() else None
        if checkpoint is not None and checkpoint.line >= 500:
            break
        assert first.returncode is None, "the import ended before it could be killed"
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    os.kill(first.pid, signal.SIGKILL)
    await first.wait()
    killed_at = Checkpoint.load(checkpoint_file)
    assert killed_at is not None and not killed_at.complete and killed_at.line < len(rows)
    # Ingest may still be finishing batches the killed run had in flight while the rerun sends
    # them again: whichever comes second is a duplicate, so nothing here waits for it to finish
    # (a wait for the log to stay unchanged for 100 ms took a slow ingest for a finished one).
    second = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE, env=env)
    stdout, _ = await second.communicate()
    assert second.returncode == 2, stdout.decode()

    done = Checkpoint.load(checkpoint_file)
    assert done is not None and done.complete and done.line == len(rows)  # the header is line 1
    assert len(done.runs) == 2 and done.runs[1].from_line == killed_at.line + 1
    assert done.counts.lines == lines and done.counts.rejected == bad

    # Every good line stored exactly once. A count short of it may still grow (a batch of the
    # killed run finishing); one past it never shrinks back.
    async def stored_once() -> bool:
        stored = (await _stream_state(nats_url))[0] - before
        assert stored <= good, f"{stored - good} lines stored twice"
        return stored == good

    await eventually(stored_once, timeout_s=30)
    # Each good line: accepted by the killed run before its last checkpoint, or by the rerun, or
    # sent by the killed run past its checkpoint and so DUPLICATE in the rerun.
    assert done.counts.accepted + done.counts.duplicate == good
    assert killed_at.counts.accepted + done.runs[1].counts.accepted + done.runs[1].counts.duplicate == good
    assert f"this run (from line {killed_at.line + 1})" in stdout.decode()

    async def all_merged() -> bool:
        return (await _stream_state(nats_url))[1] == 0

    await eventually(all_merged, timeout_s=30)  # leave the profile service idle for the next test


async def test_catalog_csv_import_sends_exact_prices(
    tmp_path: Path, importing: Callable[..., ImportOptions], unique: str
) -> None:
    path = tmp_path / "catalog.csv"
    path.write_text(
        "sku,name,price,currency,category,in_stock\n"
        f"{unique}-1,Runner,129.95,EUR,shoes/running,true\n"
        f"{unique}-2,Sock,12;50,EUR,socks,1\n"
        f"{unique}-3,Cap,0.10,EURO,hats,0\n"
    )
    options = importing(path=path, format=Format.CATALOG_CSV, quiet=True)
    code, out, _ = await run(options)
    assert code == 2
    assert "accepted   1" in out
    assert "line 3: price: not a decimal number: '12;50'" in out
    assert "line 4: product_upserted.price.currency_code:" in out  # ingest's own reason
