"""A worker process killed with SIGKILL in the middle of a step: the lease brings the row back.

A subprocess runs ``shared.worker.run_chunk`` (the code every worker runs) for one claimed row of a
step that sleeps far longer than the test. While it lives, its heartbeat keeps extending the lease;
once it is killed nothing does, and the sweep returns the row to PENDING with the lost attempt on
record. The next attempt completes, and anything the dead attempt might still say is refused.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from shared.pg_state import PgStateAPI
from shared.state_api import Outcome, StepFailure, StepResult, TaskRef
from shared.worker import run_chunk

from .contract import Conn, company, configure_step, fetch, state, with_attempt

REPO = Path(__file__).resolve().parents[1]
STEP = "crash_step"
RESULTS = "crash_step_results"
TIMEOUT_SECONDS = 2
DEADLINE = 15.0

WORKER = """
import asyncio, json, sys
from shared.pg_state import PgStateAPI
from shared.state_api import TaskRef
from shared.worker import run_chunk

async def main() -> None:
    async with await PgStateAPI.open(sys.argv[1], max_size=2) as api:
        await run_chunk(api, sys.argv[2], [TaskRef.from_json(json.loads(sys.argv[3]))])

asyncio.run(main())
"""


@pytest.fixture
async def api(dsn: str) -> AsyncIterator[PgStateAPI]:
    async with await PgStateAPI.open(dsn, max_size=4) as state_api:
        yield state_api


@pytest.fixture
def worker_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Worker subprocesses started by a test; any still running at the end are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def poll(check: Any, what: str, *, timeout: float = DEADLINE, interval: float = 0.05) -> Any:
    """Await ``check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)


async def test_sigkilled_worker_loses_its_lease_and_the_row_is_retried(
    dsn: str, api: PgStateAPI, conn: Conn, worker_processes: list[subprocess.Popen[bytes]]
) -> None:
    await conn.execute(
        sql.SQL(
            "create table {0} (like public.step_a_results including all);"
            " alter table {0} enable row level security"
        ).format(sql.Identifier(RESULTS))
    )
    await conn.execute(
        "insert into enrichment_registry (step_name, modal_function_name, results_table, config)"
        " values (%s, 'step_a', %s, %s)",
        (
            STEP,
            RESULTS,
            Jsonb(
                {
                    "sleep_ms": 600_000,
                    "timeout_seconds": TIMEOUT_SECONDS,
                    "max_attempts": 3,
                    "backoff_seconds": 0,
                }
            ),
        ),
    )
    batch_id = await api.create_batch([STEP], [company(1)])
    [claimed] = await api.claim(10, batch_ids=[batch_id])
    first = claimed.task
    assert first.attempt == 1

    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, dsn, claimed.function_name, json.dumps(first.to_json())],
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_URL"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    worker_processes.append(proc)

    async def in_progress() -> dict[str, Any] | None:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        row = await state(conn, first)
        return row if row["status"] == "IN_PROGRESS" else None

    started = await poll(in_progress, "the worker starts the row")
    # The live worker heartbeats (every third of the lease): the lease moves forward.
    first_lease = started["lease_expires_at"]

    async def lease_extended() -> bool:
        row = await state(conn, first)
        return bool(row["status"] == "IN_PROGRESS" and row["lease_expires_at"] > first_lease)

    await poll(lease_extended, "the worker's heartbeat extends the lease")

    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    assert (await state(conn, first))["status"] == "IN_PROGRESS"  # nobody else knows yet

    async def swept_back() -> dict[str, Any] | None:
        swept = await api.sweep_expired_leases()
        assert all(s.task == first and s.status == "PENDING" for s in swept), swept
        row = await state(conn, first)
        return row if row["status"] == "PENDING" else None

    row = await poll(swept_back, "the sweep returns the row to PENDING", interval=0.2)
    assert row["attempt"] == 1
    last_error = row["meta"]["last_error"]
    assert last_error["kind"] == "lease_expired"
    assert last_error["attempt"] == 1
    assert last_error["will_retry"] is True
    assert "IN_PROGRESS" in last_error["message"]
    assert await fetch(conn, f"select * from {RESULTS}") == []

    # The dead attempt's late start (a platform re-run of the lost call) finds the row PENDING.
    [late_start] = await api.start([first])
    assert late_start.outcome is Outcome.WRONG_STATUS

    await configure_step(conn, STEP, sleep_ms=10)
    [reclaimed] = await api.claim(10, batch_ids=[batch_id])
    second = reclaimed.task
    assert second == with_attempt(first, 2)
    report = await run_chunk(api, reclaimed.function_name, [second])
    assert (report.completed, report.refused, report.retried, report.failed) == (1, 0, 0, 0)

    row = await state(conn, first)
    assert (row["status"], row["attempt"]) == ("COMPLETED", 2)
    results = await fetch(conn, f"select item_id, attempt, result from {RESULTS}")
    assert results == [
        {"item_id": first.item_id, "attempt": 2, "result": {"slept_ms": 10, "attempt": 2}}
    ]
    batch = await fetch(conn, "select status::text as s from batches where id = %s", (batch_id,))
    assert batch == [{"s": "COMPLETED"}]

    # Whatever the dead attempt says now is refused and changes nothing.
    await assert_late_calls_refused(api, first)
    assert (await state(conn, first))["status"] == "COMPLETED"
    assert await fetch(conn, f"select item_id, attempt, result from {RESULTS}") == results


async def assert_late_calls_refused(api: PgStateAPI, stale: TaskRef) -> None:
    [done] = await api.complete([StepResult(stale, {"slept_ms": 600_000, "attempt": 1})])
    assert done.outcome is Outcome.STALE_ATTEMPT
    [failed] = await api.fail([StepFailure(stale, "late failure", retryable=False)])
    assert failed.outcome is Outcome.STALE_ATTEMPT
    [beat] = await api.heartbeat([stale])
    assert beat.outcome is Outcome.STALE_ATTEMPT
    [released] = await api.release([stale], "late release")
    assert released.outcome is Outcome.STALE_ATTEMPT
