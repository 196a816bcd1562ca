"""A cancel that runs while completions commit: nothing they seed escapes it (issue 11, item 6).

Two real transactions on PostgreSQL: a completion holds its transaction open (its next-step rows
inserted but not committed) while ``cancel_batch`` runs on another connection. The cancel must
wait for it and then cancel those next steps too; before the fix they were outside its snapshot
and stayed PENDING, to be run by the next claimer.
"""

from __future__ import annotations

import asyncio

import psycopg
from psycopg.types.json import Jsonb

from shared.pg_state import PgStateAPI
from shared.state_api import Outcome, StepResult
from tests.contract import TWO_STEPS, claim_and_start, company, states
from tests.test_worker_faults import poll

Conn = psycopg.AsyncConnection[tuple[object, ...]]


async def waiting_backends(conn: Conn) -> int:
    cur = await conn.execute(
        "select count(*) from pg_stat_activity"
        " where datname = current_database() and wait_event_type = 'Lock'"
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


async def test_a_cancel_waits_for_completions_in_flight_and_cancels_what_they_seed(
    dsn: str, api: PgStateAPI, conn: Conn
) -> None:
    batch_id = await api.create_batch(TWO_STEPS, [company(i) for i in range(20)])
    started = await claim_and_start(api, batch_id)
    payload = [
        {**t.to_json(), "result": {"domain": f"d{i}.example"}} for i, t in enumerate(started)
    ]

    async with await psycopg.AsyncConnection.connect(dsn) as completer:
        await completer.execute("select * from public.complete_steps(%s)", (Jsonb(payload),))
        cancel = asyncio.create_task(api.cancel_batch(batch_id))

        async def cancel_waits() -> bool:
            return await waiting_backends(conn) >= 1

        await poll(cancel_waits, 5, "cancel_batch waiting for the open completion")
        assert not cancel.done()
        await completer.commit()
    await asyncio.wait_for(cancel, 5)

    rows = await states(conn, batch_id)
    active = [r for r in rows if r["status"] in ("PENDING", "QUEUED", "IN_PROGRESS")]
    assert active == [], f"{len(active)} rows escaped the cancel"
    seeded = [r for r in rows if r["step_name"] == TWO_STEPS[1]]
    assert len(seeded) == 20 and {r["meta"]["error"] for r in seeded} == {"cancelled"}
    assert await api.claim(100, batch_ids=[batch_id]) == []


async def test_a_completion_after_a_cancel_is_refused_and_seeds_nothing(
    api: PgStateAPI, conn: Conn
) -> None:
    batch_id = await api.create_batch(TWO_STEPS, [company(i) for i in range(3)])
    started = await claim_and_start(api, batch_id)
    await api.cancel_batch(batch_id)
    done = await api.complete([StepResult(t, {"domain": "x.example"}) for t in started])
    assert {o.outcome for o in done} == {Outcome.WRONG_STATUS}
    assert {r["step_name"] for r in await states(conn, batch_id)} == {TWO_STEPS[0]}
