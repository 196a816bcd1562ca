"""The step handler and the completion probe behind ``bench/fault_matrix.py``.

Loaded into ``enrich run`` / ``enrich serve`` with ``ENRICH_STEP_MODULES=bench.fault_steps`` (the
repository root on ``PYTHONPATH``). It adds one handler, ``fault_step``, which registry rows name
as their ``modal_function_name``. Its config (registry ``config`` JSON):

``sleep_ms`` (default 0)
    How long the pretend API call takes.
``hang_ratio`` (default 0)
    The share of (item, step) pairs whose early attempts never return (a hung HTTP call). The
    choice is a hash of item id and step name, so it is the same in every process and run.
``hang_attempts`` (default 1)
    Attempts up to this number of a chosen pair hang; later attempts behave normally.

Two append-only logs, each line one ``os.write`` on a file opened with ``O_APPEND`` (so lines of
concurrent processes never interleave), tab-separated:

``FAULT_LOG``: the handler's events, ``<event> item step attempt pid unix_time``, where event is
    ``start``, ``hang`` (this call will never return), ``finish`` (the handler returned a result)
    or ``cancel`` (the call was cancelled: shut down or cut off at its timeout). At import, one
    ``load - - - pid time shared_path`` line says which ``shared`` package the process runs.
``FAULT_ACK_LOG``: ``ack item step attempt pid called_at answered_at`` for every row
    ``PgStateAPI.complete`` answered ``ok``, written after the answer came back. The module wraps
    that method at import time, so this is exactly what the database acknowledged to a worker.
"""

from __future__ import annotations

import asyncio
import os
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import shared
from shared.pg_state import PgStateAPI
from shared.state_api import StepResult, TaskOutcome
from shared.steps.base import StepContext, StepHandler

EVENT_LOG_ENV = "FAULT_LOG"
ACK_LOG_ENV = "FAULT_ACK_LOG"
HASH_BUCKETS = 1_000_000

_fds: dict[str, int] = {}


def _append(env_name: str, fields: Sequence[object]) -> None:
    """Append one tab-separated line to the file named by ``env_name`` (if set), atomically."""
    path = os.environ.get(env_name)
    if not path:
        return
    fd = _fds.get(path)
    if fd is None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        _fds[path] = fd
    os.write(fd, ("\t".join(str(f) for f in fields) + "\n").encode())


def _event(event: str, ctx: StepContext) -> None:
    _append(
        EVENT_LOG_ENV,
        (event, ctx.item_id, ctx.step_name, ctx.attempt, os.getpid(), f"{time.time():.6f}"),
    )


def hangs(ctx: StepContext) -> bool:
    """Whether this attempt is one of the injected never-returning calls."""
    ratio = float(ctx.config.get("hang_ratio", 0))
    if ratio <= 0 or ctx.attempt > int(ctx.config.get("hang_attempts", 1)):
        return False
    bucket = zlib.crc32(f"{ctx.item_id}:{ctx.step_name}".encode()) % HASH_BUCKETS
    return bucket < ratio * HASH_BUCKETS


async def fault_step(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Log the start, hang or sleep ``config.sleep_ms``, log the finish, succeed."""
    _event("start", ctx)
    try:
        if hangs(ctx):
            _event("hang", ctx)
            await asyncio.Event().wait()  # never set: only cancellation ends this call
        sleep_ms = float(ctx.config.get("sleep_ms", 0))
        if sleep_ms > 0:
            await asyncio.sleep(sleep_ms / 1000)
    except asyncio.CancelledError:
        _event("cancel", ctx)
        raise
    _event("finish", ctx)
    return {"attempt": ctx.attempt, "pid": os.getpid()}


def _probe_complete() -> None:
    """Wrap ``PgStateAPI.complete`` so each acknowledged completion lands in ``FAULT_ACK_LOG``."""
    original = PgStateAPI.complete
    if getattr(original, "_fault_probe", False):
        return

    async def complete(self: PgStateAPI, results: Sequence[StepResult]) -> list[TaskOutcome]:
        called = f"{time.time():.6f}"
        outcomes = await original(self, results)
        answered = f"{time.time():.6f}"
        for outcome in outcomes:
            if outcome.ok:
                task = outcome.task
                _append(
                    ACK_LOG_ENV,
                    (
                        "ack",
                        task.item_id,
                        task.step_name,
                        task.attempt,
                        os.getpid(),
                        called,
                        answered,
                    ),
                )
        return outcomes

    complete._fault_probe = True  # type: ignore[attr-defined]
    PgStateAPI.complete = complete  # type: ignore[method-assign]


_probe_complete()
_append(
    EVENT_LOG_ENV,
    ("load", "-", "-", "-", os.getpid(), f"{time.time():.6f}", os.path.dirname(shared.__file__)),
)

HANDLERS: dict[str, StepHandler] = {"fault_step": fault_step}
