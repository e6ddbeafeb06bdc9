"""The services' PostgreSQL pools, on a real server."""

from __future__ import annotations

from sendtime_common.database import create_pool


async def test_a_released_connection_gets_no_reset_round_trip_but_an_unfinished_transaction_is_rolled_back(
    database_url: str,
) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1, server_settings={"application_name": "t"})
    sent: list[str] = []
    try:
        async with pool.acquire() as conn:
            conn.add_query_logger(lambda record: sent.append(record.query))
            await conn.fetchval("SELECT 1")
        assert sent == ["SELECT 1"]  # not followed by the default RESET ALL and friends

        async with pool.acquire() as conn:  # asyncpg logs the abandoned transaction as an error
            transaction = conn.transaction()
            await transaction.start()
            await conn.execute("CREATE TABLE abandoned_in_a_transaction (i int)")
        async with pool.acquire() as conn:
            assert "ROLLBACK" in sent
            assert await conn.fetchval("SELECT to_regclass('abandoned_in_a_transaction')") is None
            assert await conn.fetchval("SHOW application_name") == "t"  # the pool's session settings stay
    finally:
        await pool.close()


async def test_sessions_plan_with_the_ssd_random_page_cost_unless_told_otherwise(database_url: str) -> None:
    for kwargs, expected in (({}, "1.1"), ({"random_page_cost": 2.0}, "2")):
        pool = await create_pool(database_url, min_size=1, max_size=1, **kwargs)  # type: ignore[arg-type]
        try:
            assert await pool.fetchval("SHOW random_page_cost") == expected
        finally:
            await pool.close()
