"""The worker entry point: run one chunk of claimed tasks of one step function.

This is the code every worker runs, a Modal function in production and the local pool offline:
start the tasks (the database returns each item's input and the step's config), run the step
handler on each, then complete the successes and fail the failures, each in one bulk call. While
handlers run, a heartbeat keeps the leases of the chunk alive. A task whose start is refused (stale
attempt, cancelled batch) is skipped: another attempt owns it.

Failures are classified once, here: ``RetryableError`` and unexpected exceptions are retried with
backoff by the database, ``TerminalError`` fails the row at once. If the worker is cancelled
(Ctrl-C, shutdown), the unfinished tasks are released back to PENDING without burning an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.errors import RetryableError, StaleAttempt, TerminalError
from shared.state_api import StartedTask, StateAPI, StepFailure, StepResult, TaskRef
from shared.steps import HANDLERS, StepContext, StepHandler

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 300.0


@dataclass
class ChunkReport:
    """What happened to one chunk; ``refused`` rows belonged to another attempt."""

    completed: int = 0
    retried: int = 0
    failed: int = 0
    refused: int = 0
    released: int = 0
    errors: list[str] = field(default_factory=list)


def resolve_handler(
    function_name: str, handlers: Mapping[str, StepHandler] | None = None
) -> StepHandler:
    registry = HANDLERS if handlers is None else handlers
    try:
        return registry[function_name]
    except KeyError:
        known = ", ".join(sorted(registry))
        raise TerminalError(
            f"no step handler named {function_name!r} (known: {known}); check the registry's "
            "modal_function_name"
        ) from None


async def run_chunk(
    api: StateAPI,
    function_name: str,
    tasks: Sequence[TaskRef],
    *,
    handlers: Mapping[str, StepHandler] | None = None,
    concurrency: int = 64,
) -> ChunkReport:
    """Start, run, and complete or fail ``tasks`` (all of one step function). Never raises for a
    task's own failure; raises only if the database itself cannot be reached."""
    report = ChunkReport()
    if not tasks:
        return report
    try:
        handler = resolve_handler(function_name, handlers)
    except TerminalError as exc:
        # Nothing can run these: fail them terminally rather than letting leases expire repeatedly.
        outcomes = await api.fail([StepFailure(t, str(exc), retryable=False) for t in tasks])
        report.failed = sum(o.ok for o in outcomes)
        report.refused = len(outcomes) - report.failed
        report.errors.append(str(exc))
        return report

    started = await api.start(tasks)
    runnable = [s for s in started if s.ok]
    report.refused += len(started) - len(runnable)
    if not runnable:
        return report

    # Tasks still running (heartbeated), and tasks that reached a verdict (never released).
    pending: dict[TaskRef, StartedTask] = {s.task: s for s in runnable}
    decided: set[TaskRef] = set()
    results: list[StepResult] = []
    failures: list[StepFailure] = []
    semaphore = asyncio.Semaphore(max(1, concurrency))

    async def heartbeat(task: TaskRef) -> None:
        outcomes = await api.heartbeat([task])
        if not outcomes or not outcomes[0].ok:
            raise StaleAttempt(
                f"attempt {task.attempt} of {task.step_name} for item {task.item_id} is no "
                "longer current; stopping"
            )

    async def run_one(started_task: StartedTask) -> None:
        task = started_task.task
        ctx = StepContext(
            batch_id=task.batch_id,
            item_id=task.item_id,
            step_name=task.step_name,
            attempt=task.attempt,
            config=started_task.config or {},
            heartbeat=lambda: heartbeat(task),
        )
        try:
            async with semaphore:
                verdict = await _run_handler(handler, started_task, ctx)
        finally:
            pending.pop(task, None)
        decided.add(task)
        if isinstance(verdict, StepResult):
            results.append(verdict)
        elif isinstance(verdict, StepFailure):
            failures.append(verdict)
        else:
            report.refused += 1

    beat = asyncio.create_task(_keep_alive(api, pending, _lease_seconds(runnable)))
    try:
        await asyncio.gather(*(run_one(s) for s in runnable))
    except asyncio.CancelledError:
        # Shutdown: hand back what never reached a verdict, keep what did.
        unfinished = [s.task for s in runnable if s.task not in decided]
        with contextlib.suppress(Exception):
            released = await asyncio.shield(api.release(unfinished, "worker shut down"))
            report.released = sum(o.ok for o in released)
        await _settle(api, results, failures, report)
        raise
    finally:
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
    await _settle(api, results, failures, report)
    return report


async def _run_handler(
    handler: StepHandler, started_task: StartedTask, ctx: StepContext
) -> StepResult | StepFailure | None:
    """Run one task and classify the outcome; None means the attempt turned out stale."""
    task = started_task.task
    try:
        # Typed as object: a handler may break its contract, and that must fail the row, not us.
        result: object = await handler(started_task.raw_data or {}, ctx)
    except StaleAttempt:
        return None
    except TerminalError as exc:
        return StepFailure(task, str(exc), retryable=False)
    except RetryableError as exc:
        return StepFailure(task, str(exc), retryable=True)
    except Exception as exc:  # an unexpected bug or library error: retry, and say what it was
        return StepFailure(task, f"{type(exc).__name__}: {exc}", retryable=True)
    if not isinstance(result, Mapping):
        return StepFailure(
            task,
            f"step {task.step_name} returned {type(result).__name__}, not a JSON object",
            False,
        )
    return StepResult(task, result)


async def _settle(
    api: StateAPI, results: list[StepResult], failures: list[StepFailure], report: ChunkReport
) -> None:
    if results:
        outcomes = await asyncio.shield(api.complete(results))
        accepted = sum(o.ok for o in outcomes)
        report.completed += accepted
        report.refused += len(outcomes) - accepted
    if failures:
        fail_outcomes = await asyncio.shield(api.fail(failures))
        for outcome in fail_outcomes:
            if not outcome.ok:
                report.refused += 1
            elif outcome.status == "PENDING":
                report.retried += 1
            else:
                report.failed += 1
        report.errors.extend(f.error for f in failures[:5])
    results.clear()
    failures.clear()


def _lease_seconds(started: Sequence[StartedTask]) -> float:
    timeouts = [
        float((s.config or {}).get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)) for s in started
    ]
    return min(timeouts) if timeouts else DEFAULT_TIMEOUT_SECONDS


async def _keep_alive(api: StateAPI, pending: Mapping[TaskRef, Any], lease_seconds: float) -> None:
    """Heartbeat every in-flight task of the chunk at a third of its lease, in one bulk call."""
    interval = max(lease_seconds / 3, 0.05)
    while True:
        await asyncio.sleep(interval)
        tasks = list(pending)
        if not tasks:
            continue
        try:
            await api.heartbeat(tasks)
        except Exception:  # a missed heartbeat is not fatal: the next one may pass
            log.warning("heartbeat for %d tasks failed", len(tasks), exc_info=True)
