"""A step handler that records every start it makes, for tests of ``enrich serve`` as a process.

``ENRICH_STEP_MODULES=tests.plugins.recording`` adds the handler ``recording``. Each call first
inserts ``(item_id, step_name, attempt, pid)`` into the plain table ``recorded_starts`` (which the
test creates: no key, so a duplicate dispatch of one attempt shows up as two rows), then sleeps
``config.sleep_ms`` and returns ``{"attempt", "pid"}``. The database is ``DATABASE_URL``.

The connection pool is opened lazily on the process's event loop (one loop per ``enrich serve``
process), so the module is meant for subprocesses, not for in-process tests.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

from psycopg_pool import AsyncConnectionPool

from shared.steps.base import StepContext, StepHandler

CREATE_TABLE = """
create table recorded_starts (
  item_id uuid not null,
  step_name text not null,
  attempt integer not null,
  pid integer not null,
  at timestamptz not null default clock_timestamp()
)
"""

_pool: AsyncConnectionPool[Any] | None = None
_lock = asyncio.Lock()


async def _connections() -> AsyncConnectionPool[Any]:
    global _pool
    async with _lock:
        if _pool is None:
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                os.environ["DATABASE_URL"],
                min_size=1,
                max_size=4,
                open=False,
                kwargs={"autocommit": True},
            )
            await pool.open(wait=True, timeout=30)
            _pool = pool
        return _pool


async def recording(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Record this start, sleep ``config.sleep_ms``, succeed."""
    pool = await _connections()
    async with pool.connection() as conn:
        await conn.execute(
            "insert into recorded_starts (item_id, step_name, attempt, pid)"
            " values (%s, %s, %s, %s)",
            (ctx.item_id, ctx.step_name, ctx.attempt, os.getpid()),
        )
    sleep_ms = float(ctx.config.get("sleep_ms", 0))
    if sleep_ms > 0:
        await asyncio.sleep(sleep_ms / 1000)
    return {"attempt": ctx.attempt, "pid": os.getpid()}


HANDLERS: dict[str, StepHandler] = {"recording": recording}
