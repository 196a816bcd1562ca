"""Transitions for faults (issue 11): rows of a cancelled batch are refused everywhere, and rows
leased by a process that is gone are taken back at once."""

from __future__ import annotations

from shared.state_api import Outcome, StateAPI, StepResult

from . import (
    TWO_STEPS,
    Conn,
    claim_all,
    claim_and_start,
    company,
    outcomes,
    register_step,
    state,
    states,
    tasks,
)

DEAD = "testhost:boot/4242/777"
ALIVE = "testhost:boot/4343/888"


async def test_rows_of_a_cancelled_batch_are_never_claimed_started_or_completed(
    state_api: StateAPI, conn: Conn
) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(i) for i in range(3)])
    [running] = await claim_and_start(state_api, batch_id, limit=1)
    [queued] = tasks(await claim_all(state_api, batch_id, limit=1))
    await state_api.cancel_batch(batch_id)
    # Rows that escaped a cancel (as a completion racing it once let them): put them back by hand,
    # through the operators' escape hatch of the direct-SQL guard (20261201000200).
    async with conn.transaction():
        await conn.execute("set local enrich.allow_direct_state_edits = on")
        await conn.execute(
            "update workflow_states set status = case when item_id = %s then 'IN_PROGRESS'"
            " when item_id = %s then 'QUEUED' else 'PENDING' end::workflow_status"
            " where batch_id = %s",
            (running.item_id, queued.item_id, batch_id),
        )

    assert await claim_all(state_api, batch_id) == []
    assert [s.outcome for s in await state_api.start([queued])] == [Outcome.WRONG_STATUS]
    done = await state_api.complete([StepResult(running, {"domain": "x.example"})])
    assert outcomes(done) == {running: Outcome.WRONG_STATUS}
    # ...and no next step was seeded for the refused completion.
    assert [r["step_name"] for r in await states(conn, batch_id)] == ["normalize_domain"] * 3


async def test_rows_leased_by_a_gone_process_are_taken_back(
    state_api: StateAPI, conn: Conn
) -> None:
    await register_step(conn, "work", {"max_attempts": 3, "backoff_seconds": 0})
    batch_id = await state_api.create_batch(["work"], [company(i) for i in range(3)])
    [queued] = tasks(await state_api.claim(1, batch_ids=[batch_id], owner=DEAD))
    [started] = tasks(await state_api.claim(1, batch_ids=[batch_id], owner=DEAD))
    await state_api.start([started])
    [other] = tasks(await state_api.claim(1, batch_ids=[batch_id], owner=ALIVE))
    await state_api.start([other])

    assert sorted(await state_api.lease_owners("testhost:")) == [DEAD, ALIVE]
    assert await state_api.lease_owners("otherhost:") == []
    assert sorted(await state_api.lease_owners("testhost:", [batch_id])) == [DEAD, ALIVE]
    # LIKE wildcards in the prefix are taken literally.
    assert await state_api.lease_owners("test_ost:") == []

    taken = await state_api.reclaim_orphaned([DEAD], batch_ids=[batch_id])

    assert sorted((t.task.item_id, t.status) for t in taken) == sorted(
        [(queued.item_id, "PENDING"), (started.item_id, "PENDING")]
    )
    never_started = await state(conn, queued)
    assert (never_started["status"], never_started["retry_from"]) == ("PENDING", 1)
    assert "never started" in never_started["meta"]["released"]["reason"]
    interrupted = await state(conn, started)
    assert (interrupted["status"], interrupted["retry_from"]) == ("PENDING", 0)
    assert interrupted["meta"]["last_error"]["kind"] == "worker_lost"
    assert (await state(conn, other))["status"] == "IN_PROGRESS"
    assert await state_api.lease_owners("testhost:") == [ALIVE]
    assert await state_api.reclaim_orphaned([]) == []
