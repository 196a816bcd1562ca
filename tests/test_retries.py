"""Retries end to end: steps run by the local pool with the shell handler ``step_a`` and its
failure injection (``fail_every``, ``fail_attempts``, ``fail_terminal``), then ``retry_failed``.

Each test step has its own registry row (``modal_function_name`` = 'step_a') and results table,
``backoff_seconds`` 0 so a retry is due at once, and a small ``sleep_ms``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any
from uuid import UUID

import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from shared.local import LocalRunner
from shared.pg_state import PgStateAPI
from shared.state_api import BatchProgress

from .contract import Conn, company, configure_step, fetch, fetch_one

ITEMS = 30
RUN_DEADLINE = 30.0
BASE_CONFIG = {"sleep_ms": 5, "backoff_seconds": 0, "timeout_seconds": 30}


async def register_shell_step(conn: Conn, name: str, config: Mapping[str, Any]) -> None:
    """A step run by the ``step_a`` handler, with its own results table."""
    table = f"{name}_results"
    await conn.execute(
        sql.SQL(
            "create table {0} (like public.step_a_results including all);"
            " alter table {0} enable row level security"
        ).format(sql.Identifier(table))
    )
    await conn.execute(
        "insert into enrichment_registry (step_name, modal_function_name, results_table, config)"
        " values (%s, 'step_a', %s, %s)",
        (name, table, Jsonb({**BASE_CONFIG, **config})),
    )


@pytest.fixture
async def api(dsn: str) -> AsyncIterator[PgStateAPI]:
    async with await PgStateAPI.open(dsn, max_size=6) as state_api:
        yield state_api


async def run_to_end(dsn: str, api: PgStateAPI, batch_id: UUID) -> BatchProgress:
    """Run the batch with the local pool until it is finished."""
    runner = LocalRunner(dsn, api, batch_ids=[batch_id], sweep_interval=0.5)

    async def finished() -> bool:
        return (await api.batch_progress(batch_id)).finished

    await asyncio.wait_for(runner.run(until=finished), RUN_DEADLINE)
    return await api.batch_progress(batch_id)


async def rows(conn: Conn, batch_id: UUID) -> list[dict[str, Any]]:
    return await fetch(
        conn,
        """
        select ws.item_id, ws.status::text as status, ws.attempt, ws.retry_from, ws.meta,
               r.attempt as result_attempt, r.result
        from workflow_states ws
        left join flaky_results r on r.batch_id = ws.batch_id and r.item_id = ws.item_id
        where ws.batch_id = %s
        """,
        (batch_id,),
    )


async def batch_status(conn: Conn, batch_id: UUID) -> str:
    row = await fetch_one(conn, "select status::text as s from batches where id = %s", (batch_id,))
    return str(row["s"])


async def result_count(conn: Conn, batch_id: UUID) -> int:
    row = await fetch_one(
        conn, "select count(*) as n from flaky_results where batch_id = %s", (batch_id,)
    )
    return int(row["n"])


async def test_fail_attempts_1_fails_each_item_once_then_completes_at_attempt_2(
    dsn: str, api: PgStateAPI, conn: Conn
) -> None:
    await register_shell_step(conn, "flaky", {"fail_attempts": 1, "max_attempts": 3})
    batch_id = await api.create_batch(["flaky"], [company(i) for i in range(ITEMS)])

    progress = await run_to_end(dsn, api, batch_id)

    assert progress.status == "COMPLETED"
    assert progress.items_completed == ITEMS
    got = await rows(conn, batch_id)
    assert len(got) == ITEMS
    for row in got:
        assert (row["status"], row["attempt"]) == ("COMPLETED", 2)
        # The result written is attempt 2's, and the first attempt's failure is on record.
        assert row["result_attempt"] == 2 and row["result"] == {"slept_ms": 5, "attempt": 2}
        last_error = row["meta"]["last_error"]
        assert last_error["attempt"] == 1 and last_error["will_retry"] is True
        assert last_error["kind"] == "worker_error"
        assert "injected failure (fail_attempts=1) at attempt 1" in last_error["message"]
        assert "error" not in row["meta"]
    assert await result_count(conn, batch_id) == ITEMS


async def test_fail_every_1_fails_after_max_attempts_then_retry_failed_runs_as_configured(
    dsn: str, api: PgStateAPI, conn: Conn
) -> None:
    await register_shell_step(conn, "flaky", {"fail_every": 1, "max_attempts": 2})
    batch_id = await api.create_batch(["flaky"], [company(i) for i in range(ITEMS)])

    progress = await run_to_end(dsn, api, batch_id)

    assert progress.status == "FAILED"
    assert progress.items_failed == ITEMS and progress.items_completed == 0
    for row in await rows(conn, batch_id):
        assert (row["status"], row["attempt"]) == ("FAILED", 2)
        assert "injected failure (fail_every=1) at attempt 2" in row["meta"]["error"]
        assert row["meta"]["last_error"]["will_retry"] is False
    assert await result_count(conn, batch_id) == 0

    # Still configured to fail: retry_failed grants a fresh budget of 2 attempts, both fail.
    assert await api.retry_failed(batch_id) == ITEMS
    assert await batch_status(conn, batch_id) == "IN_PROGRESS"
    progress = await run_to_end(dsn, api, batch_id)
    assert progress.status == "FAILED"
    for row in await rows(conn, batch_id):
        assert (row["status"], row["attempt"], row["retry_from"]) == ("FAILED", 4, 2)
        assert "at attempt 4" in row["meta"]["error"]

    # Fixed: the next retry completes at its first new attempt.
    await conn.execute(
        "update enrichment_registry set config = config - 'fail_every' where step_name = 'flaky'"
    )
    assert await api.retry_failed(batch_id, "flaky") == ITEMS
    progress = await run_to_end(dsn, api, batch_id)
    assert progress.status == "COMPLETED" and progress.items_completed == ITEMS
    for row in await rows(conn, batch_id):
        assert (row["status"], row["attempt"], row["result_attempt"]) == ("COMPLETED", 5, 5)
        assert "error" not in row["meta"]
    assert await result_count(conn, batch_id) == ITEMS


async def test_fail_terminal_fails_at_the_first_attempt_and_again_after_retry(
    dsn: str, api: PgStateAPI, conn: Conn
) -> None:
    await register_shell_step(
        conn, "flaky", {"fail_every": 1, "fail_terminal": True, "max_attempts": 3}
    )
    batch_id = await api.create_batch(["flaky"], [company(i) for i in range(ITEMS)])

    progress = await run_to_end(dsn, api, batch_id)

    assert progress.status == "FAILED" and progress.items_failed == ITEMS
    for row in await rows(conn, batch_id):
        assert (row["status"], row["attempt"]) == ("FAILED", 1)
        assert "injected failure (fail_every=1) at attempt 1" in row["meta"]["error"]

    assert await api.retry_failed(batch_id) == ITEMS
    progress = await run_to_end(dsn, api, batch_id)
    assert progress.status == "FAILED"
    for row in await rows(conn, batch_id):
        # Terminal errors are never retried, whatever max_attempts says: one attempt per retry.
        assert (row["status"], row["attempt"]) == ("FAILED", 2)

    await configure_step(conn, "flaky", fail_terminal=False, fail_attempts=2)
    assert await api.retry_failed(batch_id) == ITEMS
    progress = await run_to_end(dsn, api, batch_id)
    # fail_attempts=2 selects attempts 1..2: attempt 3 succeeds.
    assert progress.status == "COMPLETED"
    for row in await rows(conn, batch_id):
        assert (row["status"], row["attempt"], row["result_attempt"]) == ("COMPLETED", 3, 3)


async def test_retries_mix_within_one_batch_and_chain_to_the_next_step(
    dsn: str, api: PgStateAPI, conn: Conn
) -> None:
    """fail_every=2 fails about half the items once (fail_attempts=1); those retry and every item
    then moves on to step_b, which is seeded only after the retried step completed."""
    await register_shell_step(
        conn, "flaky", {"fail_every": 2, "fail_attempts": 1, "max_attempts": 2}
    )
    await configure_step(conn, "step_b", sleep_ms=1, backoff_seconds=0)
    batch_id = await api.create_batch(["flaky", "step_b"], [company(i) for i in range(ITEMS)])

    progress = await run_to_end(dsn, api, batch_id)

    assert progress.status == "COMPLETED" and progress.items_completed == ITEMS
    steps = await fetch(
        conn,
        "select item_id, step_name, attempt, status::text as status from workflow_states"
        " where batch_id = %s",
        (batch_id,),
    )
    assert len(steps) == 2 * ITEMS
    assert {r["status"] for r in steps} == {"COMPLETED"}
    expected = {(r["item_id"], "flaky", 2 if r["item_id"].int % 2 == 0 else 1) for r in steps} | {
        (r["item_id"], "step_b", 1) for r in steps
    }
    assert {(r["item_id"], r["step_name"], r["attempt"]) for r in steps} == expected
    assert any(attempt == 2 for _, _, attempt in expected)  # some item did retry
    assert await result_count(conn, batch_id) == ITEMS
    step_b = await fetch_one(
        conn, "select count(*) as n from step_b_results where batch_id = %s", (batch_id,)
    )
    assert step_b["n"] == ITEMS
