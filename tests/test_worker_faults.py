"""The worker and the local pool under slow, hung and cancelled calls (issue 11, items 1, 2, 4).

- A hung handler is cut off at its step's timeout, even one that ignores cancellation, and the rows
  of its chunk are written as soon as they finish instead of waiting for it.
- A hung row holds one slot of the pool, not a chunk's worth.
- Cancelling a chunk is never swallowed, even while a heartbeat is in flight.
- A step that takes half its lease runs once per item: finished rows are written at once (so their
  leases never lapse unheartbeated) and nothing waits QUEUED in a local queue.
- Stopping the pool is bounded when the database does not answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from uuid import UUID

import psycopg
import pytest

from shared.local import LocalDispatcher, LocalRunner
from shared.pg_state import PgStateAPI
from shared.state_api import ClaimedTask, StateAPI, TaskOutcome, TaskRef
from shared.steps.base import StepContext
from shared.worker import run_chunk
from tests.contract import company, register_step, states

Conn = psycopg.AsyncConnection[tuple[object, ...]]


async def poll(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def status_counts(conn: Conn, batch_id: UUID) -> Counter[str]:
    return Counter(r["status"] for r in await states(conn, batch_id))


async def new_batch(
    conn: Conn, api: StateAPI, step: str, config: Mapping[str, Any], items: int
) -> UUID:
    await register_step(conn, step, config)
    return await api.create_batch([step], [{**company(i), "n": i} for i in range(items)])


async def test_a_hung_call_is_cut_off_and_its_chunk_mates_are_written_at_once(
    api: PgStateAPI, conn: Conn
) -> None:
    batch_id = await new_batch(
        conn, api, "hangy", {"timeout_seconds": 2, "max_attempts": 3, "backoff_seconds": 0}, 20
    )
    claimed = await api.claim(100, batch_ids=[batch_id])
    release = asyncio.Event()

    async def handler(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
        if raw["n"] == 0:
            while not release.is_set():  # hangs, and shrugs off cancellation
                with contextlib.suppress(asyncio.CancelledError):
                    await release.wait()
        return {"n": raw["n"]}

    settled: list[int] = []
    chunk = asyncio.create_task(
        run_chunk(
            api,
            "hangy",
            [c.task for c in claimed],
            handlers={"hangy": handler},
            on_settled=settled.append,
        )
    )
    try:

        async def others_completed() -> bool:
            return (await status_counts(conn, batch_id))["COMPLETED"] == 19

        # Written long before the hung call's 2 s timeout, while it still runs.
        await poll(others_completed, 1.5, "the 19 other rows COMPLETED")
        assert not chunk.done()
        assert sum(settled) == 19

        report = await asyncio.wait_for(chunk, 5)
        assert (report.completed, report.retried, report.refused) == (19, 1, 0)
        assert sum(settled) == 20
        hung = next(r for r in await states(conn, batch_id) if r["raw_data"]["n"] == 0)
        assert hung["status"] == "PENDING"
        assert "timed out after 2s" in hung["meta"]["last_error"]["message"]
    finally:
        release.set()
        if not chunk.done():
            chunk.cancel()


async def test_a_hung_row_holds_one_slot_of_the_pool_not_a_chunk(
    api: PgStateAPI, conn: Conn
) -> None:
    batch_id = await new_batch(conn, api, "hangy", {"timeout_seconds": 30}, 100)
    claimed = await api.claim(100, batch_ids=[batch_id])
    release = asyncio.Event()

    async def handler(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
        if raw["n"] == 0:
            await release.wait()
        return {}

    pool = LocalDispatcher(api, max_in_flight=100, chunk_size=100, handlers={"hangy": handler})
    await pool.dispatch("hangy", claimed)
    assert pool.capacity() == 0
    try:

        async def one_slot_held() -> bool:
            return pool.in_flight == 1

        await poll(one_slot_held, 5, "99 slots freed while one call hangs")
        assert pool.capacity() == 99
        assert (await status_counts(conn, batch_id))["COMPLETED"] == 99
    finally:
        release.set()
        await pool.stop()


class SlowCancelHeartbeat:
    """A State API whose heartbeat is in flight for a while and takes a moment to cancel, as a
    database call does (psycopg sends a cancel request and waits for the server)."""

    def __init__(self, inner: PgStateAPI) -> None:
        self.inner = inner
        self.beating = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def heartbeat(self, tasks: Sequence[TaskRef]) -> list[TaskOutcome]:
        self.beating.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.3)
            raise
        return []


async def test_cancelling_a_chunk_is_never_swallowed(api: PgStateAPI, conn: Conn) -> None:
    batch_id = await new_batch(conn, api, "quick", {"timeout_seconds": 0.3}, 1)
    claimed = await api.claim(10, batch_ids=[batch_id])
    slow = SlowCancelHeartbeat(api)
    returned = asyncio.Event()

    async def handler(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
        await slow.beating.wait()  # finish while the chunk's heartbeat is in flight
        returned.set()
        return {}

    chunk = asyncio.create_task(
        run_chunk(slow, "quick", [c.task for c in claimed], handlers={"quick": handler})  # type: ignore[arg-type]
    )
    await asyncio.wait_for(returned.wait(), 5)
    chunk.cancel()  # lands while the chunk stops its heartbeat
    done, _ = await asyncio.wait({chunk}, timeout=10)
    assert done, "the chunk never ended"
    assert chunk.cancelled(), "the cancellation was swallowed: the chunk returned normally"


async def test_a_step_taking_half_its_lease_runs_once_per_item(
    dsn: str, api: PgStateAPI, conn: Conn
) -> None:
    batch_id = await new_batch(
        conn, api, "slowish", {"timeout_seconds": 0.9, "max_attempts": 3, "backoff_seconds": 0}, 240
    )
    runs: Counter[UUID] = Counter()

    async def handler(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
        runs[ctx.item_id] += 1
        await asyncio.sleep(0.45)
        return {}

    runner = LocalRunner(
        dsn,
        api,
        batch_ids=[batch_id],
        max_in_flight=240,
        chunk_size=150,
        workers=1,
        claim_limit=240,
        sweep_interval=0.1,
        handlers={"slowish": handler},
    )

    async def finished() -> bool:
        return (await api.batch_progress(batch_id)).finished

    await asyncio.wait_for(runner.run(until=finished), 30)
    assert await status_counts(conn, batch_id) == Counter({"COMPLETED": 240})
    assert len(runs) == 240
    twice = [item for item, n in runs.items() if n > 1]
    assert twice == [], f"{len(twice)} items ran more than once"


class Unreachable:
    """A State API whose calls never answer, as a database behind a dead connection."""

    def __init__(self, inner: PgStateAPI) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        if name in ("release", "complete", "fail", "heartbeat"):
            return self._hang
        return getattr(self.inner, name)

    async def _hang(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()


async def test_stopping_the_pool_is_bounded_when_the_database_does_not_answer(
    api: PgStateAPI, conn: Conn
) -> None:
    batch_id = await new_batch(conn, api, "stuck", {"timeout_seconds": 30}, 10)
    claimed: list[ClaimedTask] = await api.claim(10, batch_ids=[batch_id])
    running = asyncio.Event()

    async def handler(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
        running.set()
        await asyncio.sleep(30)
        return {}

    pool = LocalDispatcher(Unreachable(api), handlers={"stuck": handler})  # type: ignore[arg-type]
    await pool.dispatch("stuck", claimed)
    await asyncio.wait_for(running.wait(), 5)
    started = time.monotonic()
    await pool.stop(timeout=1.0)
    assert time.monotonic() - started < 3.0
