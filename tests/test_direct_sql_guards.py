"""Direct SQL on workflow_states (issue 9, item 7): Studio users edit rows; the State API moves
them.

A hand-typed UPDATE of a row's status (Studio's table editor, the SQL editor, PostgREST as the
service role) is refused; the State API functions, the operators' retry and cancel included, are
not. A row left QUEUED or IN_PROGRESS without a lease (made by hand through the documented escape
hatch, or before the guard existed) is recovered by the sweep instead of waiting forever.
"""

from __future__ import annotations

import psycopg
import pytest

from shared.pg_state import PgStateAPI
from shared.state_api import StepFailure, StepResult

from .contract import Conn, company, fetch, fetch_one
from .test_rls import as_role

ESCAPE_HATCH = "set local enrich.allow_direct_state_edits = on"


async def batch_status(conn: Conn, batch_id: object) -> str:
    row = await fetch_one(conn, "select status::text as s from batches where id = %s", (batch_id,))
    status: str = row["s"]
    return status


async def statuses(conn: Conn, batch_id: object) -> list[str]:
    rows = await fetch(
        conn,
        "select status::text as s from workflow_states where batch_id = %s order by id",
        (batch_id,),
    )
    return [r["s"] for r in rows]


async def test_completing_rows_by_hand_is_refused(conn: Conn, api: PgStateAPI) -> None:
    """The repro: the batch used to complete with no result at all."""
    batch_id = await api.create_batch(["normalize_domain"], [company(0), company(1)])
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only by the State API"):
        await conn.execute(
            "update workflow_states set status = 'COMPLETED' where batch_id = %s", (batch_id,)
        )
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await conn.execute(
            "update workflow_states set status = 'IN_PROGRESS' where batch_id = %s", (batch_id,)
        )
    assert await statuses(conn, batch_id) == ["PENDING", "PENDING"]
    assert await api.sweep_expired_leases() == []
    assert await batch_status(conn, batch_id) == "PENDING"

    # Columns that move no state stay editable by hand.
    done = await conn.execute(
        'update workflow_states set meta = meta || \'{"note": "checked"}\','
        " run_after = now() - interval '1 second' where batch_id = %s",
        (batch_id,),
    )
    assert done.rowcount == 2

    # The State API and the operators' tools (enrich retry / cancel) still move rows.
    claimed = await api.claim(10, batch_ids=[batch_id])
    started = await api.start([c.task for c in claimed])
    await api.complete([StepResult(started[0].task, {"domain": "acme.example"})])
    await api.fail([StepFailure(started[1].task, "boom", retryable=False)])
    assert sorted(await statuses(conn, batch_id)) == ["COMPLETED", "FAILED"]
    assert await api.retry_failed(batch_id) == 1
    assert await api.cancel_batch(batch_id) == 1
    assert await api.retry_failed(batch_id) == 1


@pytest.mark.parametrize(
    "statement",
    [
        "update workflow_states set attempt = 7",
        "update workflow_states set retry_from = 7",
        "update workflow_states set step_name = 'step_b'",
        "update workflow_states set step_index = 3",
        "insert into workflow_states (batch_id, item_id, step_name, step_index, status)"
        " select batch_id, item_id, 'step_b', 1, 'COMPLETED' from workflow_states",
        # A DO block is typed by hand too.
        "do $$ begin update workflow_states set status = 'COMPLETED'; end $$",
    ],
)
async def test_other_hand_made_state_changes_are_refused(
    conn: Conn, api: PgStateAPI, statement: str
) -> None:
    batch_id = await api.create_batch(["step_a", "step_b"], [company(0)])
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await conn.execute(statement.encode())
    row = await fetch_one(
        conn,
        "select status::text as status, attempt, retry_from, step_name, step_index,"
        " (select count(*) from workflow_states) as n from workflow_states where batch_id = %s",
        (batch_id,),
    )
    assert row == {
        "status": "PENDING",
        "attempt": 0,
        "retry_from": 0,
        "step_name": "step_a",
        "step_index": 0,
        "n": 1,
    }


async def test_the_service_role_goes_through_the_state_api_too(conn: Conn, api: PgStateAPI) -> None:
    batch_id = await api.create_batch(["step_a"], [company(0)])
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="only by the State API"):
        async with as_role(conn, "service_role", {"role": "service_role"}):
            await conn.execute("update workflow_states set status = 'FAILED'")
    async with as_role(conn, "service_role", {"role": "service_role"}):
        claimed = await fetch(conn, "select * from claim_steps(10)")
        assert [c["batch_id"] for c in claimed] == [batch_id]


async def test_the_escape_hatch_lets_an_operator_edit_rows_in_one_transaction(
    conn: Conn, api: PgStateAPI
) -> None:
    batch_id = await api.create_batch(["step_a"], [company(0)])
    async with conn.transaction():
        await conn.execute(ESCAPE_HATCH)
        await conn.execute(
            "update workflow_states set status = 'FAILED' where batch_id = %s", (batch_id,)
        )
    assert await statuses(conn, batch_id) == ["FAILED"]
    # Only for that transaction.
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        await conn.execute(
            "update workflow_states set status = 'PENDING' where batch_id = %s", (batch_id,)
        )


@pytest.mark.parametrize("status", ["QUEUED", "IN_PROGRESS"])
async def test_the_sweep_recovers_a_row_without_a_lease(
    conn: Conn, api: PgStateAPI, status: str
) -> None:
    """IN_PROGRESS with no lease used to wait forever (`enrich run --batch` never returned)."""
    batch_id = await api.create_batch(["step_a"], [company(0), company(1)])
    claimed = await api.claim(1, batch_ids=[batch_id])
    async with conn.transaction():
        await conn.execute(ESCAPE_HATCH)
        await conn.execute(
            "update workflow_states set status = %s, lease_expires_at = null"
            " where batch_id = %s and status = 'PENDING'",
            (status, batch_id),
        )
    swept = await api.sweep_expired_leases()
    assert len(swept) == 1
    [row] = await fetch(
        conn,
        "select status::text as status, meta -> 'last_error' ->> 'kind' as kind"
        " from workflow_states where batch_id = %s and item_id <> %s",
        (batch_id, claimed[0].task.item_id),
    )
    if status == "QUEUED":  # never started: handed back without using up an attempt
        assert row["status"] == "PENDING"
    else:
        assert row == {"status": "PENDING", "kind": "no_lease"}
    # The leased row is left alone, and the batch finishes as usual (once the retry's backoff,
    # which an operator may cut short by hand, has passed).
    assert len(await statuses(conn, batch_id)) == 2
    await conn.execute(
        "update workflow_states set run_after = now() - interval '1 second' where batch_id = %s",
        (batch_id,),
    )
    rest = await api.claim(10, batch_ids=[batch_id])
    started = await api.start([c.task for c in [*claimed, *rest]])
    await api.complete([StepResult(s.task, {}) for s in started])
    assert await batch_status(conn, batch_id) == "COMPLETED"
