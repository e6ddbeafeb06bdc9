"""A first measurement of the triggers engine's firer (not yet a ``make bench`` target): how many
fires a second one replica commits and hands to its dispatcher, and how late they are, with
100,000 other episodes waiting.

It makes a fresh database, starts a private NATS (the engine subscribes to the profile change
and erasure streams), a loopback webhook receiver answering 204, and one ``TriggersEngine`` on
the real clock with in-process profile reader and renderer (instant: this measures the engine,
PostgreSQL and the dispatcher, not the profile and render services). It inserts ``--waiting``
episodes due tomorrow and ``--fires`` episodes due at ``--rate`` a second from a few seconds
ahead, each of its own customer, then reports the fires a second over the run, the lateness
(fire minus due time: fire_at plus the allowed lateness) at p50, p99 and max, and when the last
webhook was delivered.

    python scripts/measure_triggers_firer.py --fires 10000 --rate 1000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
from google.protobuf import struct_pb2

import devstack
from sendtime.profile.v1 import profile_pb2
from sendtime.render.v1 import render_pb2
from sendtime.triggers.v1 import triggers_pb2
from sendtime_common.database import create_pool
from sendtime_common.event_log import JetStreamEventLog, JetStreamSettings
from triggers import builtin
from triggers.destination_store import DestinationStore
from triggers.engine import EngineSettings, TriggersEngine
from triggers.firer import lateness_percentile
from triggers.secret_box import SecretBox
from triggers.signing import SigningKeys, new_signing_secret
from triggers.ssrf import AllowList, UrlPolicy
from triggers.store import migrate_store
from triggers.trigger_store import TriggerStore

DELIVERED = triggers_pb2.DELIVERY_STATE_DELIVERED
ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TRIGGER_ID = "cart-abandoned"
LEAD_S = 4.0  # the first episode falls due this long after the engine starts
RECEIVER = """
import sys
from aiohttp import web
async def receive(request):
    await request.read()
    return web.Response(status=204)
app = web.Application()
app.router.add_post("/hooks", receive)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


class InstantProfiles:
    async def get_profile(self, customer_id: str) -> profile_pb2.Profile:
        return profile_pb2.Profile(
            customer_id=customer_id,
            version=1,
            cart=profile_pb2.Cart(items=[profile_pb2.CartItem(sku="TRAIL-42", quantity=1)]),
        )


class InstantRenderer:
    async def render(
        self, template: str, customer_id: str, variables: struct_pb2.Struct
    ) -> render_pb2.RenderResponse:
        return render_pb2.RenderResponse(
            status=render_pb2.RENDER_STATUS_RENDERED,
            subject="Your cart is waiting",
            html="<p>Trail runner</p>",
            text="Trail runner",
            template_version=1,
            profile_version=1,
        )


async def insert_episodes(
    pool: asyncpg.Pool, prefix: str, count: int, first_due: datetime, every_s: float
) -> None:
    """``count`` waiting episodes of customers ``{prefix}-{i}``, the i-th due at first_due + i * every_s."""
    await pool.execute(
        """
        INSERT INTO triggers_episodes (customer_id, trigger_id, episode_key, state, opened_at, last_entry_at,
            fire_at, due_at)
        SELECT $1 || '-' || i, $2, '', 'waiting', d - interval '1 hour 5 seconds',
            d - interval '1 hour 5 seconds', d - interval '5 seconds', d
        FROM generate_series(0, $3 - 1) AS i,
             LATERAL (SELECT $4::timestamptz + i * $5::float8 * interval '1 second' AS d) AS due
        """,
        prefix,
        TRIGGER_ID,
        count,
        first_due,
        every_s,
    )
    await pool.execute("ANALYZE triggers_episodes")


async def main(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.WARNING)
    database = f"sendtime_measure_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{database}"')
    url = ADMIN_URL.rpartition("/")[0] + f"/{database}"
    workdir = Path(tempfile.mkdtemp(prefix="measure-triggers-"))
    port = devstack.free_port()
    nats = devstack.start_nats(port, workdir / "nats")
    # The receiver runs in a process of its own, as a real one would.
    receiver_port = devstack.free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(receiver_port)])
    pool = await create_pool(url, min_size=2, max_size=args.pool)
    log = await JetStreamEventLog.connect(JetStreamSettings(url=f"nats://127.0.0.1:{port}"))
    engine: TriggersEngine | None = None
    try:
        await migrate_store(pool)
        box = SecretBox.generate()
        await DestinationStore(pool, box).create(
            "receiver",
            triggers_pb2.Destination(
                webhook=triggers_pb2.WebhookTarget(url=f"http://127.0.0.1:{receiver_port}/hooks"),
                max_concurrency=args.webhook_concurrency,
            ),
            signing_keys=SigningKeys(new_signing_secret()),
        )
        if args.no_webhooks:  # the firer alone: its deliveries wait in the dispatcher
            await pool.execute(
                f"UPDATE triggers_destinations SET state = {triggers_pb2.DESTINATION_STATE_DISABLED}"
            )
        await TriggerStore(pool).create(
            TRIGGER_ID, builtin.cart_abandoned(["destinations/receiver"], "templates/abandoned-cart")
        )
        await insert_episodes(pool, "waiting", args.waiting, datetime.now(UTC) + timedelta(days=1), 0.001)
        first_due = datetime.now(UTC) + timedelta(seconds=LEAD_S)
        await insert_episodes(pool, "due", args.fires, first_due, 1 / args.rate)
        engine = TriggersEngine(
            pool=pool,
            event_log=log,
            profiles=InstantProfiles(),
            renderer=InstantRenderer(),
            secret_box=box,
            url_policy=UrlPolicy(AllowList.parse(["127.0.0.0/8"])),
            settings=EngineSettings(
                owner="measure", fire_concurrency=args.concurrency, claim_limit=args.claim_limit
            ),
        )
        await engine.start()
        deadline = time.monotonic() + LEAD_S + args.fires / args.rate + 60
        while engine.firer.stats.fired < args.fires and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        fired_by, fired_at = time.monotonic(), datetime.now(UTC)
        delivered_query = f"SELECT count(*) FROM triggers_deliveries WHERE state = {DELIVERED}"
        while not args.no_webhooks and await pool.fetchval(delivered_query) < engine.firer.stats.fired:
            if time.monotonic() > fired_by + 30:
                break
            await asyncio.sleep(0.05)
        delivered, delivered_at = await pool.fetchval(delivered_query), datetime.now(UTC)
        stats = engine.firer.stats
        run_s = (fired_at - first_due).total_seconds()
        p50, p99 = lateness_percentile(stats, 0.5), lateness_percentile(stats, 0.99)
        worst = max(stats.lateness) if stats.lateness else None
        print(f"waiting episodes: {args.waiting:,}; due: {args.fires:,} at {args.rate:,.0f}/s")
        print(
            f"fired: {stats.fired:,} in {run_s:.2f} s after the first fell due ({stats.fired / run_s:,.0f}/s)"
        )
        print(f"lateness: p50 {p50}, p99 {p99}, max {worst}")
        print(
            f"webhooks delivered: {delivered:,}, all by {(delivered_at - first_due).total_seconds():.2f} s in"
        )
        print(f"outcomes: {dict(stats.outcomes)}")
    finally:
        if engine is not None:
            await engine.close()
        await log.close()
        await pool.close()
        receiver.terminate()
        receiver.wait()
        devstack.stop_process(nats)
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fires", type=int, default=10_000)
    parser.add_argument("--rate", type=float, default=1000.0, help="episodes falling due a second")
    parser.add_argument("--waiting", type=int, default=100_000, help="other episodes, due tomorrow")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--claim-limit", type=int, default=100)
    parser.add_argument("--pool", type=int, default=20)
    parser.add_argument("--webhook-concurrency", type=int, default=50)
    parser.add_argument("--no-webhooks", action="store_true", help="the destination disabled: fires only")
    asyncio.run(main(parser.parse_args()))
