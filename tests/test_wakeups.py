"""``LocalRunner`` wake-ups: notifications are hints. Duplicates are harmless, a burst becomes a
handful of conductor passes, and without any notification the timer still finishes the work."""

from __future__ import annotations

import asyncio
import json
import time
import types
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, NoReturn
from uuid import UUID

import psycopg
import pytest
from psycopg.types.json import Jsonb

import shared.local
from shared.local import CHANNEL, LocalRunner
from shared.pg_state import PgStateAPI
from shared.steps import StepContext, StepHandler

from .contract import Conn, company, fetch, fetch_one

STEPS = ("count_one", "count_two")
RUN_DEADLINE = 30.0


class CountingHandler:
    """Counts every start of (item, step, attempt): a second start of one attempt is a double
    dispatch."""

    def __init__(self, sleep: float = 0.002) -> None:
        self.starts: Counter[tuple[UUID, str, int]] = Counter()
        self.sleep = sleep
        # The last step of this item waits for the gate: the batch cannot finish before it opens.
        self.gated_item: UUID | None = None
        self.gate = asyncio.Event()

    async def __call__(self, raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
        self.starts[(ctx.item_id, ctx.step_name, ctx.attempt)] += 1
        await asyncio.sleep(self.sleep)
        if ctx.item_id == self.gated_item and ctx.step_name == STEPS[-1]:
            await self.gate.wait()
        return {"attempt": ctx.attempt}

    def handlers(self) -> dict[str, StepHandler]:
        return {"counting": self}


@pytest.fixture
async def api(dsn: str, conn: Conn) -> AsyncIterator[PgStateAPI]:
    for step in STEPS:
        await conn.execute(
            "insert into enrichment_registry (step_name, modal_function_name, config)"
            " values (%s, 'counting', %s)",
            (step, Jsonb({"timeout_seconds": 60, "max_attempts": 3, "backoff_seconds": 0})),
        )
    async with await PgStateAPI.open(dsn, max_size=6) as state_api:
        yield state_api


async def until_true(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


async def assert_done_once(
    conn: Conn, batch_id: UUID, counting: CountingHandler, items: int
) -> None:
    """The batch completed, every row was claimed once (attempt 1) and started once."""
    batch = await fetch_one(
        conn, "select status::text as s from batches where id = %s", (batch_id,)
    )
    assert batch["s"] == "COMPLETED"
    rows = await fetch(
        conn,
        "select status::text as status, attempt, count(*) as n from workflow_states"
        " where batch_id = %s group by 1, 2",
        (batch_id,),
    )
    assert [(r["status"], r["attempt"], r["n"]) for r in rows] == [
        ("COMPLETED", 1, items * len(STEPS))
    ]
    assert len(counting.starts) == items * len(STEPS)
    assert set(counting.starts.values()) == {1}


async def test_duplicate_notifications_are_harmless(dsn: str, api: PgStateAPI, conn: Conn) -> None:
    items = 300
    batch_id = await api.create_batch(list(STEPS), [company(i) for i in range(items)])
    counting = CountingHandler()
    last = await fetch_one(
        conn,
        "select id from batch_items where batch_id = %s order by seq desc limit 1",
        (batch_id,),
    )
    counting.gated_item = last["id"]
    runner = LocalRunner(
        dsn,
        api,
        batch_ids=[batch_id],
        handlers=counting.handlers(),
        max_in_flight=60,
        chunk_size=30,
        claim_limit=60,
        workers=2,
        sweep_interval=0.5,
    )

    async def finished() -> bool:
        return (await api.batch_progress(batch_id)).finished

    run = asyncio.create_task(runner.run(until=finished))
    await runner.wait_listening()
    # The same payload, again and again, each its own transaction (PostgreSQL folds identical
    # notifications only within one transaction), while the batch runs: it cannot finish before
    # the gate opens.
    payload = json.dumps(
        {
            "op": "UPDATE",
            "batch_ids": [str(batch_id)],
            "more_batches": False,
            "ready": 1,
            "finished": 0,
        }
    )
    duplicates = 1_000
    for _ in range(duplicates):
        await conn.execute("select pg_notify(%s, %s)", (CHANNEL, payload))

    async def heard_them() -> bool:
        assert not run.done(), run
        return runner.stats.notifications >= duplicates

    await until_true(heard_them, "the runner hears the duplicates")
    counting.gate.set()
    stats = await asyncio.wait_for(run, RUN_DEADLINE)

    assert stats.notifications >= duplicates
    assert stats.claimed == items * len(STEPS)
    await assert_done_once(conn, batch_id, counting, items)


async def test_a_burst_of_notifications_becomes_a_handful_of_passes(
    dsn: str, api: PgStateAPI, conn: Conn
) -> None:
    burst = 10_000
    items = 100
    batch_id = await api.create_batch(list(STEPS), [company(i) for i in range(items)])
    counting = CountingHandler()
    runner = LocalRunner(
        dsn, api, batch_ids=[batch_id], handlers=counting.handlers(), sweep_interval=60
    )

    async def heard_all_and_finished() -> bool:
        return runner.stats.notifications >= burst and (await api.batch_progress(batch_id)).finished

    run = asyncio.create_task(runner.run(until=heard_all_and_finished))
    await runner.wait_listening()
    passes_before = runner.stats.passes
    # Distinct payloads, all naming the batch (so every one is relevant), in one transaction: all
    # are delivered at its commit, at once.
    await conn.execute(
        f"""
        do $$
        begin
          for i in 1..{burst} loop
            perform pg_notify('{CHANNEL}', json_build_object(
              'batch_ids', json_build_array('{batch_id}'::text), 'burst', i)::text);
          end loop;
        end
        $$
        """.encode()
    )
    stats = await asyncio.wait_for(run, RUN_DEADLINE)

    assert stats.notifications >= burst
    assert stats.passes - passes_before < 100, stats
    await assert_done_once(conn, batch_id, counting, items)


class BrokenListen:
    """Stands in for psycopg.AsyncConnection in shared.local: LISTEN cannot connect at all."""

    attempts = 0

    @classmethod
    async def connect(cls, *args: Any, **kwargs: Any) -> NoReturn:
        cls.attempts += 1
        raise psycopg.OperationalError("LISTEN is broken for this test")


async def test_without_notifications_the_timer_sweep_finishes_the_batch(
    dsn: str, api: PgStateAPI, conn: Conn, monkeypatch: pytest.MonkeyPatch
) -> None:
    BrokenListen.attempts = 0
    monkeypatch.setattr(
        shared.local, "psycopg", types.SimpleNamespace(AsyncConnection=BrokenListen)
    )
    counting = CountingHandler()
    runner = LocalRunner(dsn, api, handlers=counting.handlers(), sweep_interval=0.3)
    batch_ids: list[UUID] = []

    async def finished() -> bool:
        return bool(batch_ids) and (await api.batch_progress(batch_ids[0])).finished

    run = asyncio.create_task(runner.run(until=finished))

    async def idle() -> bool:
        return runner.stats.passes >= 1 and BrokenListen.attempts >= 1

    await until_true(idle, "the runner made its first pass and tried to LISTEN")
    # A batch inserted with plain SQL (as Supabase Studio does), while the runner is idle: only
    # the timer can notice it.
    items = 50
    row = await fetch_one(
        conn,
        "select public.create_batch(%s, %s) as id",
        (Jsonb(list(STEPS)), Jsonb([company(i) for i in range(items)])),
    )
    batch_ids.append(row["id"])
    stats = await asyncio.wait_for(run, RUN_DEADLINE)

    assert stats.notifications == 0
    assert stats.passes >= 2
    assert BrokenListen.attempts >= 1
    await assert_done_once(conn, batch_ids[0], counting, items)
