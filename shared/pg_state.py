"""``StateAPI`` on PostgreSQL, through psycopg 3 (async) and a connection pool.

psycopg rather than SQLAlchemy's async engine: ``bench/driver_overhead.py`` measured the two equal
here (claim + start + complete of 500 rows: 52-57 ms through this class, 50-53 ms through an
AsyncEngine on the same psycopg driver, within noise), because every call is one statement calling
a SQL function and the database dominates. With no speed to gain, one layer wins: the embedded
default needs psycopg's COPY and LISTEN/NOTIFY anyway. The seed's SQLAlchemy models live in
``shared.models`` for reading and analysis.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from shared.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    EnrichError,
    InvalidInput,
    NotFound,
    QuotaExceeded,
)
from shared.queries import query
from shared.state_api import (
    STATUSES,
    BatchProgress,
    BudgetState,
    ClaimedTask,
    CostSummary,
    FailOutcome,
    Outcome,
    StartedTask,
    StepDeferral,
    StepFailure,
    StepResult,
    StepSubmission,
    SweptRow,
    TaskCost,
    TaskOutcome,
    TaskRef,
)

T = TypeVar("T")
Row = dict[str, Any]


def translate_db_error(exc: psycopg.Error) -> EnrichError:
    """Map a database error to the project's errors by SQLSTATE (set by the State API functions)."""
    diag = exc.diag
    message = diag.message_primary or str(exc).strip()
    if diag.message_hint:
        message = f"{message} ({diag.message_hint})"
    if exc.sqlstate == "22023" or isinstance(exc, psycopg.errors.DataError):
        return InvalidInput(message)
    if exc.sqlstate == "23514" and (diag.constraint_name or "").startswith("quota_"):
        return QuotaExceeded(message)  # 20261201000200_quotas_and_guards.sql
    if exc.sqlstate == "P0002":
        return NotFound(message)
    if (diag.message_primary or "").startswith("could not load library"):
        # plpgsql.so: undefined symbol: the server's package was upgraded under it (its running
        # binary is the old one, the library on disk the new one). Nothing but a restart helps.
        return ConfigurationError(
            f"{message}: the PostgreSQL server cannot load its own libraries, as when its package "
            "is upgraded while it runs; restart it (the private cluster: `enrich db down && "
            "enrich db up`)"
        )
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        # Includes a connection lost to a server restart and the pool's "no connection in time".
        return DatabaseUnavailable(message)
    return EnrichError(message)


# A deadlock (40P01) or serialization failure (40001) rolled the whole call back: it changed
# nothing, so running it again is safe. Two bulk calls for the same rows in different orders (two
# callback receivers applying one burst, say) deadlock now and then; the loser runs again.
ROLLBACK_RERUNS = 4
ROLLBACK_SQLSTATES = frozenset({"40P01", "40001"})


async def rollback_pause(rerun: int) -> None:
    """A short, jittered pause before running a rolled-back call again, so the two do not meet
    in the same order twice."""
    await asyncio.sleep(random.uniform(0.005, 0.03) * (rerun + 1))


def _task(row: Row) -> TaskRef:
    return TaskRef(row["batch_id"], row["item_id"], row["step_name"], row["attempt"])


def _uuid_list(values: Sequence[UUID] | None) -> list[str] | None:
    return None if values is None else [str(v) for v in values]


class PgStateAPI:
    """The State API over a psycopg async pool. Create with ``await PgStateAPI.open(dsn)``."""

    def __init__(self, pool: AsyncConnectionPool[Any]) -> None:
        self._pool = pool

    @classmethod
    async def open(cls, dsn: str, *, min_size: int = 1, max_size: int = 8) -> PgStateAPI:
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": True, "connect_timeout": 10},
            name="enrich-state-api",
            # No check on checkout: it costs a round trip per call (8% of bench/throughput.py).
            # After a database restart each dead pooled connection fails one call, which the
            # callers repeat (shared.outage), and the pool replaces it.
            # A call waits at most this long for a connection, so an outage shows within seconds
            # (callers retry DatabaseUnavailable) instead of psycopg_pool's default 30 s.
            timeout=10,
        )
        try:
            await pool.open(wait=True, timeout=30)
        except psycopg.Error as exc:
            await pool.close()
            raise translate_db_error(exc) from exc
        except Exception as exc:  # pool timeout: the database never answered
            await pool.close()
            raise DatabaseUnavailable(f"cannot connect to the database: {exc}") from exc
        return cls(pool)

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> PgStateAPI:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _rows(self, name: str, params: Mapping[str, Any]) -> list[Row]:
        for rerun in range(ROLLBACK_RERUNS + 1):
            try:
                async with self._pool.connection() as conn:
                    cur = conn.cursor(row_factory=dict_row)
                    await cur.execute(query(name), params)
                    rows: list[Row] = await cur.fetchall()
                    return rows
            except psycopg.Error as exc:
                if exc.sqlstate not in ROLLBACK_SQLSTATES or rerun == ROLLBACK_RERUNS:
                    raise translate_db_error(exc) from exc
                await rollback_pause(rerun)
        raise AssertionError("unreachable")

    async def _each(
        self, name: str, params: Mapping[str, Any], build: Callable[[Row], T]
    ) -> list[T]:
        return [build(row) for row in await self._rows(name, params)]

    async def create_batch(
        self,
        blueprint: Sequence[str],
        items: Sequence[Mapping[str, Any]],
        *,
        client_id: UUID | None = None,
        name: str | None = None,
        budget_usd: float | None = None,
        use_cache: bool = True,
    ) -> UUID:
        rows = await self._rows(
            "create_batch",
            {
                "blueprint": Jsonb(list(blueprint)),
                "items": Jsonb(list(items)),
                "client_id": client_id,
                "name": name,
                "budget_usd": budget_usd,
                "use_cache": use_cache,
            },
        )
        batch_id: UUID = rows[0]["batch_id"]
        return batch_id

    async def claim(
        self,
        limit: int,
        *,
        step_names: Sequence[str] | None = None,
        batch_ids: Sequence[UUID] | None = None,
        owner: str | None = None,
    ) -> list[ClaimedTask]:
        params = {
            "limit": limit,
            "step_names": None if step_names is None else list(step_names),
            "batch_ids": _uuid_list(batch_ids),
            "owner": owner,
        }
        return await self._each(
            "claim_steps",
            params,
            lambda r: ClaimedTask(
                _task(r), r["modal_function_name"], r["step_type"], r["lease_expires_at"]
            ),
        )

    async def start(self, tasks: Sequence[TaskRef]) -> list[StartedTask]:
        return await self._each(
            "start_steps",
            {"tasks": Jsonb([t.to_json() for t in tasks])},
            lambda r: StartedTask(
                _task(r), Outcome(r["outcome"]), r["raw_data"], r["config"], r["inputs"]
            ),
        )

    async def complete(self, results: Sequence[StepResult]) -> list[TaskOutcome]:
        payload = [{**r.task.to_json(), "result": dict(r.result)} for r in results]
        return await self._each(
            "complete_steps",
            {"results": Jsonb(payload, dumps=_dumps)},
            lambda r: TaskOutcome(_task(r), Outcome(r["outcome"])),
        )

    async def fail(self, failures: Sequence[StepFailure]) -> list[FailOutcome]:
        payload = [
            {**f.task.to_json(), "error": f.error, "retryable": f.retryable} for f in failures
        ]
        return await self._each(
            "fail_steps",
            {"failures": Jsonb(payload)},
            lambda r: FailOutcome(_task(r), Outcome(r["outcome"]), r["status"]),
        )

    async def defer(self, deferrals: Sequence[StepDeferral]) -> list[FailOutcome]:
        return await self._each(
            "defer_steps",
            {"deferrals": Jsonb([deferral_json(d) for d in deferrals])},
            lambda r: FailOutcome(_task(r), Outcome(r["outcome"]), r["status"]),
        )

    async def record_costs(self, costs: Sequence[TaskCost]) -> int:
        if not costs:
            return 0
        rows = await self._rows("record_costs", {"costs": Jsonb([c.to_json() for c in costs])})
        return int(rows[0]["recorded"])

    async def set_budget(self, batch_id: UUID, budget_usd: float | None) -> BudgetState:
        rows = await self._rows(
            "set_batch_budget", {"batch_id": batch_id, "budget_usd": budget_usd}
        )
        return budget_from_json(rows[0]["budget"])

    async def submit(self, submissions: Sequence[StepSubmission]) -> list[TaskOutcome]:
        payload = [{**s.task.to_json(), "request_id": s.request_id} for s in submissions]
        return await self._each(
            "submit_steps",
            {"submissions": Jsonb(payload)},
            lambda r: TaskOutcome(_task(r), Outcome(r["outcome"])),
        )

    async def heartbeat(self, tasks: Sequence[TaskRef]) -> list[TaskOutcome]:
        return await self._each(
            "heartbeat_steps",
            {"tasks": Jsonb([t.to_json() for t in tasks])},
            lambda r: TaskOutcome(_task(r), Outcome(r["outcome"])),
        )

    async def release(
        self, tasks: Sequence[TaskRef], reason: str, *, delay_seconds: float = 0.0
    ) -> list[TaskOutcome]:
        payload = [{**t.to_json(), "reason": reason, "delay_seconds": delay_seconds} for t in tasks]
        return await self._each(
            "release_steps",
            {"tasks": Jsonb(payload)},
            lambda r: TaskOutcome(_task(r), Outcome(r["outcome"])),
        )

    async def mark_dispatched(self, dispatches: Sequence[tuple[TaskRef, str]]) -> int:
        payload = [{**task.to_json(), "call_id": call_id} for task, call_id in dispatches]
        rows = await self._rows("mark_dispatched", {"dispatches": Jsonb(payload)})
        return int(rows[0]["marked"])

    async def sweep_expired_leases(self, limit: int = 10_000) -> list[SweptRow]:
        return await self._each(
            "sweep_expired_leases", {"limit": limit}, lambda r: SweptRow(_task(r), r["status"])
        )

    async def lease_owners(self, prefix: str, batch_ids: Sequence[UUID] | None = None) -> list[str]:
        rows = await self._rows(
            "lease_owners", {"prefix": prefix, "batch_ids": _uuid_list(batch_ids)}
        )
        return [str(r["lease_owner"]) for r in rows]

    async def reclaim_orphaned(
        self, owners: Sequence[str], *, batch_ids: Sequence[UUID] | None = None
    ) -> list[SweptRow]:
        return await self._each(
            "reclaim_orphaned_steps",
            {"owners": list(owners), "batch_ids": _uuid_list(batch_ids)},
            lambda r: SweptRow(_task(r), r["status"]),
        )

    async def retry_failed(self, batch_id: UUID, step_name: str | None = None) -> int:
        rows = await self._rows("retry_failed", {"batch_id": batch_id, "step_name": step_name})
        return int(rows[0]["retried"])

    async def cancel_batch(self, batch_id: UUID) -> int:
        rows = await self._rows("cancel_batch", {"batch_id": batch_id})
        return int(rows[0]["cancelled"])

    async def batch_progress(self, batch_id: UUID) -> BatchProgress:
        rows = await self._rows("batch_progress", {"batch_id": batch_id})
        return progress_from_json(rows[0]["progress"])


def progress_from_json(data: Mapping[str, Any]) -> BatchProgress:
    """Build a BatchProgress from batch_progress()'s JSON, steps in blueprint order."""
    steps_json: Mapping[str, Mapping[str, int]] = data["steps"]
    steps = {
        step: {status: int(steps_json[step].get(status, 0)) for status in STATUSES}
        for step in data["blueprint"]
    }
    return BatchProgress(
        batch_id=UUID(str(data["batch_id"])),
        name=data.get("name"),
        status=str(data["status"]),
        items=int(data["items"]),
        cancelled=bool(data["cancelled"]),
        steps=steps,
        awaiting={step: int(data.get("awaiting_callback", {}).get(step, 0)) for step in steps},
        cost=CostSummary.from_json(data.get("cost")),
        skipped={step: int(data.get("skipped", {}).get(step, 0)) for step in steps},
        cached={step: int(data.get("cached", {}).get(step, 0)) for step in steps},
    )


def deferral_json(deferral: StepDeferral) -> dict[str, Any]:
    """A deferral as defer_steps takes it."""
    return {
        **deferral.task.to_json(),
        "provider": deferral.provider,
        "retry_after_seconds": deferral.retry_after,
        "error": deferral.error,
    }


def budget_from_json(data: Mapping[str, Any]) -> BudgetState:
    """set_batch_budget()'s answer."""
    budget = data.get("budget_usd")
    return BudgetState(
        batch_id=UUID(str(data["batch_id"])),
        budget_usd=None if budget is None else float(budget),
        spent_usd=float(data.get("spent_usd") or 0),
        paused_reason=data.get("paused_reason"),
    )


def _dumps(obj: Any) -> str:
    # Step results may carry values json cannot encode (UUIDs, datetimes): keep them as text
    # rather than failing the whole bulk completion.
    return json.dumps(obj, default=str)
