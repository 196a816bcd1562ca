"""The worker entry point: run one chunk of claimed tasks of one step function.

This is the code every worker runs, a Modal function in production and the local pool offline:
start the tasks (the database returns each item's input and the step's config), run the step
handler on each, and write each verdict as soon as it is known: a background writer completes the
successes and fails the failures in bulk, so verdicts that arrive together share one call but none
waits for the slowest task of its chunk. While a task runs (and until its verdict is written), a
heartbeat keeps its lease alive; a written row drops out of the heartbeat. A task whose start is
refused (stale attempt, cancelled batch) is skipped: another attempt owns it.

Every handler is cut off at its step's ``timeout_seconds`` (the same limit Modal puts on the
function): a call that never returns fails its row (retryable) instead of holding a lease, a slot
of the pool and the chunk forever. A handler that ignores the cancellation is abandoned, not
awaited.

Failures are classified once, here: ``RetryableError``, timeouts and unexpected exceptions are
retried with backoff by the database, ``TerminalError`` fails the row at once. If the worker is
cancelled (Ctrl-C, shutdown), the tasks still running are released back to PENDING without burning
an attempt and verdicts already reached are still written. While the database is unreachable
(a restart, a failover), calls are repeated until it is back, for up to ``outage_seconds``: every
call is guarded by status and attempt, so a repeat is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shared.errors import DatabaseUnavailable, RetryableError, StaleAttempt, TerminalError
from shared.outage import call_through_outage
from shared.state_api import StartedTask, StateAPI, StepFailure, StepResult, TaskRef
from shared.steps import HANDLERS, StepContext, StepHandler

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 300.0
# A verdict waits at most this long for others of its chunk to share its write...
FLUSH_DELAY_SECONDS = 0.05
# ...and a write carries at most this many rows.
FLUSH_MAX_ROWS = 500
# How long a worker keeps trying to reach an unreachable database before leaving its rows to their
# leases (a Supabase restart takes seconds; a longer outage is not worth holding a worker for).
DEFAULT_OUTAGE_SECONDS = 120.0
# On shutdown: how long to spend handing rows back and writing verdicts already reached.
SHUTDOWN_SECONDS = 5.0


class StepTimeout(RetryableError):
    """A step handler ran past its step's ``timeout_seconds`` and was cut off."""


@dataclass
class ChunkReport:
    """What happened to one chunk; ``refused`` rows belonged to another attempt, ``unwritten``
    verdicts could not reach the database (their leases bring the rows back)."""

    completed: int = 0
    retried: int = 0
    failed: int = 0
    refused: int = 0
    released: int = 0
    unwritten: int = 0
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
    on_settled: Callable[[int], None] | None = None,
    outage_seconds: float | None = DEFAULT_OUTAGE_SECONDS,
    report: ChunkReport | None = None,
) -> ChunkReport:
    """Start, run, and complete or fail ``tasks`` (all of one step function).

    ``on_settled(n)`` is called as rows leave this worker's hands (written, refused, released), so
    a pool can hand their slots to other work at once. Never raises for a task's own failure;
    raises ``DatabaseUnavailable`` only if the database stays unreachable past ``outage_seconds``
    before anything started.
    """
    report = report if report is not None else ChunkReport()
    settled = on_settled or (lambda n: None)
    if not tasks:
        return report

    def through_outage(call: Callable[[], Awaitable[T]], what: str) -> Awaitable[T]:
        return call_through_outage(call, limit_seconds=outage_seconds, what=what)

    try:
        handler = resolve_handler(function_name, handlers)
    except TerminalError as exc:
        # Nothing can run these: fail them terminally rather than letting leases expire repeatedly.
        failures = [StepFailure(t, str(exc), retryable=False) for t in tasks]
        outcomes = await through_outage(lambda: api.fail(failures), f"fail {function_name}")
        report.failed += sum(o.ok for o in outcomes)
        report.refused += len(outcomes) - sum(o.ok for o in outcomes)
        report.errors.append(str(exc))
        settled(len(tasks))
        return report

    started = await through_outage(lambda: api.start(tasks), f"start {function_name}")
    runnable = [s for s in started if s.ok]
    report.refused += len(started) - len(runnable)
    settled(len(started) - len(runnable))
    if not runnable:
        return report
    chunk = _Chunk(api, handler, runnable, report, settled, concurrency, outage_seconds)
    await chunk.run()
    return report


class _Chunk:
    """The started tasks of one chunk: runs them, writes verdicts as they come, heartbeats the
    rows it still holds."""

    def __init__(
        self,
        api: StateAPI,
        handler: StepHandler,
        runnable: Sequence[StartedTask],
        report: ChunkReport,
        settled: Callable[[int], None],
        concurrency: int,
        outage_seconds: float | None,
    ) -> None:
        self._api = api
        self._handler = handler
        self._runnable = list(runnable)
        self._report = report
        self._settled = settled
        self._semaphore = asyncio.Semaphore(max(1, concurrency))
        self._outage_seconds = outage_seconds
        # Rows this worker still holds (heartbeated): started, verdict not yet written.
        self._held: dict[TaskRef, None] = {s.task: None for s in runnable}
        self._decided: set[TaskRef] = set()  # reached a verdict: never released
        self._running = len(self._runnable)
        self._verdicts: list[StepResult | StepFailure] = []
        self._verdict_added = asyncio.Event()
        self._closing = False

    async def run(self) -> None:
        beat = asyncio.create_task(
            _keep_alive(self._api, self._held, _lease_seconds(self._runnable))
        )
        writer = asyncio.create_task(self._write_loop())
        try:
            await asyncio.gather(*(self._run_one(s) for s in self._runnable))
            self._close_writer()
            await _wait_for(writer)
        except asyncio.CancelledError:
            await self._shut_down(writer)
            raise
        finally:
            await cancel_and_wait(beat)
            await cancel_and_wait(writer)

    async def _run_one(self, started: StartedTask) -> None:
        task = started.task
        ctx = StepContext(
            batch_id=task.batch_id,
            item_id=task.item_id,
            step_name=task.step_name,
            attempt=task.attempt,
            config=started.config or {},
            heartbeat=lambda: _heartbeat_one(self._api, task),
        )
        async with self._semaphore:
            verdict = await _run_handler(self._handler, started, ctx)
        self._running -= 1
        if verdict is None:  # the attempt turned out stale: another attempt owns the row
            self._report.refused += 1
            self._let_go([task])
            return
        self._decided.add(task)
        self._verdicts.append(verdict)
        self._verdict_added.set()

    def _let_go(self, tasks: Sequence[TaskRef]) -> None:
        for task in tasks:
            self._held.pop(task, None)
        self._settled(len(tasks))

    # Writing verdicts ----------------------------------------------------------------------------

    def _close_writer(self) -> None:
        self._closing = True
        self._verdict_added.set()

    async def _write_loop(self) -> None:
        while True:
            if not self._verdicts:
                if self._closing:
                    return
                self._verdict_added.clear()
                await self._verdict_added.wait()
                continue
            await self._linger()
            batch, self._verdicts = self._verdicts[:FLUSH_MAX_ROWS], self._verdicts[FLUSH_MAX_ROWS:]
            await self._write(batch)

    async def _linger(self) -> None:
        """Give verdicts of tasks still running a moment to join this write."""
        deadline = asyncio.get_running_loop().time() + FLUSH_DELAY_SECONDS
        while self._running > 0 and len(self._verdicts) < FLUSH_MAX_ROWS and not self._closing:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return
            self._verdict_added.clear()
            try:
                await asyncio.wait_for(self._verdict_added.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _write(self, batch: Sequence[StepResult | StepFailure]) -> None:
        results = [v for v in batch if isinstance(v, StepResult)]
        failures = [v for v in batch if isinstance(v, StepFailure)]
        try:
            if results:
                await self._complete(results)
            if failures:
                await self._fail(failures)
        except DatabaseUnavailable as exc:
            # Given up: the rows stay leased to this attempt, and once the heartbeat stops their
            # leases expire and the sweep retries them.
            self._report.unwritten += len(batch)
            log.warning("could not write %d verdicts: %s", len(batch), exc)
        finally:
            self._let_go([v.task for v in batch])

    async def _complete(self, results: Sequence[StepResult]) -> None:
        outcomes = await call_through_outage(
            lambda: self._api.complete(results),
            limit_seconds=self._outage_seconds,
            what="complete steps",
        )
        accepted = sum(o.ok for o in outcomes)
        self._report.completed += accepted
        self._report.refused += len(outcomes) - accepted

    async def _fail(self, failures: Sequence[StepFailure]) -> None:
        outcomes = await call_through_outage(
            lambda: self._api.fail(failures),
            limit_seconds=self._outage_seconds,
            what="fail steps",
        )
        for outcome in outcomes:
            if not outcome.ok:
                self._report.refused += 1
            elif outcome.status == "PENDING":
                self._report.retried += 1
            else:
                self._report.failed += 1
        self._report.errors.extend(f.error for f in failures[:5])

    # Shutting down -------------------------------------------------------------------------------

    async def _shut_down(self, writer: asyncio.Task[None]) -> None:
        """Cancelled: hand back what never reached a verdict, write what did, within a bound."""
        unfinished = [t for t in self._held if t not in self._decided]
        if unfinished:
            try:
                outcomes = await asyncio.wait_for(
                    self._api.release(unfinished, "worker shut down"), SHUTDOWN_SECONDS
                )
                self._report.released += sum(o.ok for o in outcomes)
            except (asyncio.TimeoutError, DatabaseUnavailable) as exc:
                log.warning(
                    "could not hand back %d rows (%s); they come back when their leases expire",
                    len(unfinished),
                    exc or "the database did not answer",
                )
            self._let_go(unfinished)
        self._close_writer()
        await _wait_for(writer, SHUTDOWN_SECONDS)


async def _run_handler(
    handler: StepHandler, started_task: StartedTask, ctx: StepContext
) -> StepResult | StepFailure | None:
    """Run one task within its timeout and classify the outcome; None: the attempt is stale."""
    task = started_task.task
    timeout = float((started_task.config or {}).get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS))
    try:
        # Typed as object: a handler may break its contract, and that must fail the row, not us.
        result: object = await _within(timeout, handler(started_task.raw_data or {}, ctx))
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


async def _within(timeout: float, call: Awaitable[T]) -> T:
    """``await call`` for at most ``timeout`` seconds, then raise ``StepTimeout``. The call is
    cancelled but not awaited: a handler that swallows the cancellation cannot hold us."""
    future = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({future}, timeout=timeout)
    except asyncio.CancelledError:
        future.cancel()
        raise
    if not done:
        future.cancel()
        future.add_done_callback(_discard_outcome)
        raise StepTimeout(f"timed out after {timeout:g}s (the step's timeout_seconds)")
    return future.result()


def _discard_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so asyncio does not log it as never retrieved


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it is done, without swallowing our own cancellation."""
    task.cancel()
    await asyncio.wait({task})


async def _wait_for(task: asyncio.Task[Any], timeout: float | None = None) -> None:
    """Wait for ``task`` to end (at most ``timeout``); its own exception is logged, not raised."""
    await asyncio.wait({task}, timeout=timeout)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.error("verdict writer failed", exc_info=task.exception())


async def _heartbeat_one(api: StateAPI, task: TaskRef) -> None:
    outcomes = await api.heartbeat([task])
    if not outcomes or not outcomes[0].ok:
        raise StaleAttempt(
            f"attempt {task.attempt} of {task.step_name} for item {task.item_id} is no "
            "longer current; stopping"
        )


def _lease_seconds(started: Sequence[StartedTask]) -> float:
    timeouts = [
        float((s.config or {}).get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)) for s in started
    ]
    return min(timeouts) if timeouts else DEFAULT_TIMEOUT_SECONDS


async def _keep_alive(api: StateAPI, held: Mapping[TaskRef, Any], lease_seconds: float) -> None:
    """Heartbeat every row the chunk still holds at a third of its lease, in one bulk call."""
    interval = max(lease_seconds / 3, 0.05)
    while True:
        await asyncio.sleep(interval)
        tasks = list(held)
        if not tasks:
            continue
        try:
            await api.heartbeat(tasks)
        except DatabaseUnavailable as exc:  # not fatal: the next beat may pass
            log.debug("heartbeat for %d tasks failed: %s", len(tasks), exc)
        except Exception:
            log.warning("heartbeat for %d tasks failed", len(tasks), exc_info=True)
