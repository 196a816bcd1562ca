"""Contract tests of the State API, run against every implementation (``state_api`` fixture).

Tests drive state through the ``StateAPI`` protocol. The helpers below use raw SQL (the ``conn``
fixture, a superuser connection to the same database) only for what the protocol cannot do: set
up a test step, push a lease or a backoff into the past, and read rows the protocol does not return.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol
from uuid import UUID

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from shared.state_api import (
    ClaimedTask,
    Outcome,
    StateAPI,
    StepResult,
    TaskRef,
)

Conn = psycopg.AsyncConnection[Any]
Row = dict[str, Any]

TWO_STEPS = ("normalize_domain", "clean_company_name")
ZERO_COUNTS = {"PENDING": 0, "QUEUED": 0, "IN_PROGRESS": 0, "COMPLETED": 0, "FAILED": 0}


class HasTaskOutcome(Protocol):
    @property
    def task(self) -> TaskRef: ...

    @property
    def outcome(self) -> Outcome: ...


def company(i: int) -> dict[str, Any]:
    """A typical CSV row."""
    return {"website": f"https://www.company{i}.example/about", "name": f"Company {i} Inc"}


def counts(**nonzero: int) -> dict[str, int]:
    """A batch_progress step entry: every status, zeros included."""
    return {**ZERO_COUNTS, **nonzero}


def outcomes(rows: Iterable[HasTaskOutcome]) -> dict[TaskRef, Outcome]:
    """Outcomes keyed by task (bulk answers promise one row per input row, not an order)."""
    return {row.task: row.outcome for row in rows}


def tasks(claimed: Iterable[ClaimedTask]) -> list[TaskRef]:
    return [c.task for c in claimed]


def with_attempt(task: TaskRef, attempt: int) -> TaskRef:
    return TaskRef(task.batch_id, task.item_id, task.step_name, attempt)


# Raw SQL: set-up and inspection ------------------------------------------------------------------


async def fetch(
    conn: Conn, query: str, params: Sequence[Any] | Mapping[str, Any] = ()
) -> list[Row]:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(query.encode(), params)
    return await cur.fetchall()


async def fetch_one(conn: Conn, query: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Row:
    rows = await fetch(conn, query, params)
    assert len(rows) == 1, rows
    return rows[0]


async def db_now(conn: Conn) -> Any:
    return (await fetch_one(conn, "select clock_timestamp() as now"))["now"]


async def states(conn: Conn, batch_id: UUID, step_name: str | None = None) -> list[Row]:
    """The batch's workflow_states rows (with the item's raw_data), in item then step order."""
    return await fetch(
        conn,
        """
        select ws.*, ws.status::text as status, bi.raw_data, bi.seq
        from workflow_states ws join batch_items bi on bi.id = ws.item_id
        where ws.batch_id = %s and (%s::text is null or ws.step_name = %s)
        order by bi.seq, ws.step_index
        """,
        (batch_id, step_name, step_name),
    )


async def state(conn: Conn, task: TaskRef) -> Row:
    """The one workflow_states row of a task (whatever its attempt)."""
    return await fetch_one(
        conn,
        """
        select ws.*, ws.status::text as status from workflow_states ws
        where ws.batch_id = %s and ws.item_id = %s and ws.step_name = %s
        """,
        (task.batch_id, task.item_id, task.step_name),
    )


async def batch_row(conn: Conn, batch_id: UUID) -> Row:
    return await fetch_one(
        conn, "select b.*, b.status::text as status from batches b where b.id = %s", (batch_id,)
    )


async def item_ids(conn: Conn, batch_id: UUID) -> list[UUID]:
    rows = await fetch(
        conn, "select id from batch_items where batch_id = %s order by seq", (batch_id,)
    )
    return [r["id"] for r in rows]


async def results(conn: Conn, table: str, batch_id: UUID) -> list[Row]:
    return await fetch(
        conn,
        sql.SQL("select * from {} where batch_id = %s order by created_at, item_id")
        .format(sql.Identifier(table))
        .as_string(conn),
        (batch_id,),
    )


async def table_count(conn: Conn, table: str) -> int:
    row = await fetch_one(
        conn,
        sql.SQL("select count(*) as n from {}").format(sql.Identifier(table)).as_string(conn),
    )
    return int(row["n"])


async def register_step(
    conn: Conn,
    name: str,
    config: Mapping[str, Any],
    *,
    results_table: str | None = None,
) -> None:
    """Register a test step (its handler name is the step name)."""
    await conn.execute(
        """
        insert into enrichment_registry (step_name, modal_function_name, results_table, config)
        values (%s, %s, %s, %s)
        """,
        (name, name, results_table, Jsonb(dict(config))),
    )


async def configure_step(conn: Conn, name: str, **config: Any) -> None:
    """Merge ``config`` into a registered step's config."""
    cur = await conn.execute(
        "update enrichment_registry set config = config || %s where step_name = %s",
        (Jsonb(config), name),
    )
    assert cur.rowcount == 1, name


async def expire_leases(conn: Conn, batch_id: UUID) -> int:
    """Push the leases of the batch's QUEUED and IN_PROGRESS rows into the past."""
    cur = await conn.execute(
        """
        update workflow_states set lease_expires_at = now() - interval '1 second'
        where batch_id = %s and status in ('QUEUED', 'IN_PROGRESS')
        """,
        (batch_id,),
    )
    return cur.rowcount


async def make_ready(conn: Conn, batch_id: UUID) -> int:
    """Skip the backoff of the batch's PENDING rows (run_after into the past)."""
    cur = await conn.execute(
        """
        update workflow_states set run_after = now() - interval '1 second'
        where batch_id = %s and status = 'PENDING'
        """,
        (batch_id,),
    )
    return cur.rowcount


# Through the protocol ----------------------------------------------------------------------------


async def claim_all(api: StateAPI, batch_id: UUID, limit: int = 1000) -> list[ClaimedTask]:
    return await api.claim(limit, batch_ids=[batch_id])


async def claim_and_start(api: StateAPI, batch_id: UUID, limit: int = 1000) -> list[TaskRef]:
    """Claim the batch's ready rows and start them all; returns the started tasks."""
    claimed = tasks(await claim_all(api, batch_id, limit))
    started = await api.start(claimed)
    assert all(s.ok for s in started), started
    return claimed


async def run_wave(
    api: StateAPI, batch_id: UUID, result: Mapping[str, Any] | None = None
) -> list[TaskRef]:
    """Claim, start and complete every ready row of the batch; returns the completed tasks."""
    started = await claim_and_start(api, batch_id)
    done = await api.complete([StepResult(t, dict(result or {"ok": True})) for t in started])
    assert all(d.ok for d in done), done
    return started
