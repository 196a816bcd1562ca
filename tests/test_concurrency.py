"""Concurrent callers of the State API, each on its own connection pool (its own sessions).

The claim uses FOR UPDATE SKIP LOCKED: overlapping conductors never get the same row, and between
them get every ready row exactly once. Racing completions are settled by the status guard and the
batch roll-up's row lock.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from uuid import UUID

import pytest

from shared.pg_state import PgStateAPI
from shared.state_api import ClaimedTask, Outcome, StepResult

from .contract import Conn, company, fetch, item_ids, results, states, tasks

ITEMS = 2_000


@pytest.fixture
async def two_apis(dsn: str) -> AsyncIterator[tuple[PgStateAPI, PgStateAPI]]:
    first = await PgStateAPI.open(dsn, min_size=1, max_size=1)
    second = await PgStateAPI.open(dsn, min_size=1, max_size=1)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_two_claimers_never_share_a_row_and_get_every_row_once(
    two_apis: tuple[PgStateAPI, PgStateAPI], conn: Conn
) -> None:
    first, second = two_apis
    batch_id = await first.create_batch(["step_a"], [company(i) for i in range(ITEMS)])
    got: tuple[list[ClaimedTask], list[ClaimedTask]] = ([], [])
    overlapping_rounds = 0

    for _ in range(ITEMS):  # a bound, never reached: each round claims at least one row
        a, b = await asyncio.gather(first.claim(37), second.claim(37))
        if not a and not b:
            break
        overlapping_rounds += bool(a and b)
        assert not {c.task for c in a} & {c.task for c in b}
        got[0].extend(a)
        got[1].extend(b)

    claimed = Counter(c.task.item_id for c in got[0] + got[1])
    assert set(claimed) == set(await item_ids(conn, batch_id))
    assert set(claimed.values()) == {1}
    assert {c.task.attempt for c in got[0] + got[1]} == {1}
    # Both claimers did take part (the test exercised concurrency, not a single claimer).
    assert got[0] and got[1] and overlapping_rounds > 0
    rows = await states(conn, batch_id)
    assert len(rows) == ITEMS
    assert {(r["status"], r["attempt"]) for r in rows} == {("QUEUED", 1)}


async def test_racing_completions_of_one_attempt_write_once(
    two_apis: tuple[PgStateAPI, PgStateAPI], conn: Conn
) -> None:
    first, second = two_apis
    batch_id = await first.create_batch(
        ["normalize_domain", "clean_company_name"], [company(i) for i in range(50)]
    )
    started = tasks(await first.claim(100, batch_ids=[batch_id]))
    await first.start(started)

    a, b = await asyncio.gather(
        first.complete([StepResult(t, {"domain": "first.example"}) for t in started]),
        second.complete([StepResult(t, {"domain": "second.example"}) for t in started]),
    )

    for task in started:
        answers = [o.outcome for o in a + b if o.task == task]
        assert sorted(answers) == sorted([Outcome.OK, Outcome.WRONG_STATUS])
    stored = await results(conn, "normalize_domain_results", batch_id)
    assert len(stored) == 50
    winner = {o.task.item_id: "first.example" for o in a if o.ok} | {
        o.task.item_id: "second.example" for o in b if o.ok
    }
    assert {r["item_id"]: r["domain"] for r in stored} == winner
    assert len(await states(conn, batch_id, "clean_company_name")) == 50


async def test_concurrent_last_completions_roll_the_batch_up(
    two_apis: tuple[PgStateAPI, PgStateAPI], conn: Conn
) -> None:
    # Each batch's two items finish in two concurrent transactions: neither sees the other's row
    # finished unless the roll-up serialises them.
    first, second = two_apis
    batch_ids: list[UUID] = [
        await first.create_batch(["step_a"], [company(0), company(1)]) for _ in range(20)
    ]
    claimed = tasks(await first.claim(1000))
    await first.start(claimed)
    halves: tuple[list[StepResult], list[StepResult]] = ([], [])
    for batch_id in batch_ids:
        one, other = [t for t in claimed if t.batch_id == batch_id]
        halves[0].append(StepResult(one, {}))
        halves[1].append(StepResult(other, {}))

    for pair in zip(halves[0], halves[1], strict=True):
        done = await asyncio.gather(first.complete([pair[0]]), second.complete([pair[1]]))
        assert [o.outcome for answer in done for o in answer] == [Outcome.OK, Outcome.OK]

    rows = await fetch(
        conn, "select status::text as status from batches where id = any(%s)", (batch_ids,)
    )
    assert [r["status"] for r in rows] == ["COMPLETED"] * len(batch_ids)
