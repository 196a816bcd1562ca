"""Two bulk completions of the same rows in opposite orders deadlock in PostgreSQL (on a table big
enough that the planner drives the update from the input list). The loser is rolled back whole, so
the State API runs it again: both calls answer, each row completes once, nothing is an outage.

Found by tests/test_async_faults.py: two callback receivers applying one burst answered 503."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

from shared.pg_state import PgStateAPI
from shared.state_api import Outcome, StepResult, StepSubmission
from tests.contract import claim_and_start, company, fetch

WAITING = """
select count(*) as n from pg_stat_activity
where datname = current_database() and wait_event_type = 'Lock'
  and query like '%%complete_steps(%%'
"""


async def test_opposite_bulk_completions_both_answer_and_complete_each_row_once(
    api: PgStateAPI, conn: psycopg.AsyncConnection[Any], dsn: str
) -> None:
    busy = await api.create_batch(["step_a"], [company(i) for i in range(20_000)])
    await claim_and_start(api, busy, limit=50_000)
    batch = await api.create_batch(["step_async", "step_a"], [company(i) for i in range(100)])
    tasks = await claim_and_start(api, batch)
    await api.submit([StepSubmission(t, "r") for t in tasks])
    await conn.execute("analyze workflow_states")
    up = await PgStateAPI.open(dsn, max_size=1)
    down = await PgStateAPI.open(dsn, max_size=1)
    # A third transaction holds the middle row, so both calls lock their first halves, then wait.
    middle = tasks[50]
    holder = await psycopg.AsyncConnection.connect(dsn)
    try:
        await holder.execute(
            "select 1 from workflow_states where batch_id = %s and item_id = %s"
            " and step_name = %s for update",
            (middle.batch_id, middle.item_id, middle.step_name),
        )

        async def waiting(n: int) -> None:
            while (await fetch(conn, WAITING))[0]["n"] < n:
                await asyncio.sleep(0.02)

        first = asyncio.create_task(up.complete([StepResult(t, {"by": "up"}) for t in tasks]))
        await asyncio.wait_for(waiting(1), 10)
        second = asyncio.create_task(
            down.complete([StepResult(t, {"by": "down"}) for t in reversed(tasks)])
        )
        await asyncio.wait_for(waiting(2), 10)
        await holder.commit()
        answers = await asyncio.wait_for(asyncio.gather(first, second), 30)
    finally:
        await holder.close()
        await up.close()
        await down.close()

    applied = [{o.task for o in answer if o.outcome is Outcome.OK} for answer in answers]
    assert not applied[0] & applied[1]  # never both
    assert applied[0] | applied[1] == set(tasks)  # every row by one of them
    assert all(
        o.outcome in (Outcome.OK, Outcome.WRONG_STATUS) for answer in answers for o in answer
    )
    rows = await fetch(
        conn,
        "select count(*) as n, count(distinct item_id) as items from step_async_results"
        " where batch_id = %s",
        (batch,),
    )
    assert rows == [{"n": 100, "items": 100}]
    seeded = await fetch(
        conn,
        "select count(*) as n from workflow_states where batch_id = %s and step_name = 'step_a'",
        (batch,),
    )
    assert seeded == [{"n": 100}]
