"""The worker entry point: run one chunk of claimed tasks of one step function.

This is the code every worker runs, a Modal function in production and the local pool offline:
start the tasks (the database returns each item's input and the step's config), run the step
handler on each, and write each verdict as soon as it is known: a background writer completes the
successes and fails the failures in bulk (``shared.verdicts``), so verdicts that arrive together
share one call but none waits for the slowest task of its chunk. While a task runs (and until its
verdict is written), a heartbeat keeps its lease alive; a written row drops out of the heartbeat.
A task whose start is refused (stale attempt, cancelled batch) is skipped: another attempt owns
it.

Every handler is cut off at its step's ``timeout_seconds`` (the same limit Modal puts on the
function) by a watchdog per chunk: a call that never returns fails its row (retryable) instead of
holding a lease, a slot of the pool and the chunk forever. A handler that ignores the cancellation
is abandoned, not awaited.

Failures are classified once, here: ``RetryableError``, timeouts and unexpected exceptions are
retried with backoff by the database, ``TerminalError`` fails the row at once, ``RateLimited`` (a
429) defers the row until its Retry-After without using an attempt and slows the provider's shared
bucket. What a handler ``charge``s is summed per task and provider and written to the cost ledger
before the task's verdict (``shared.verdicts``), including for a call that then failed, timed out
or turned out stale. If the worker is
cancelled (Ctrl-C, shutdown), the tasks still running are released back to PENDING without burning
an attempt and verdicts already reached are still written. While the database is unreachable
(a restart, a failover), calls are repeated until it is back, for up to ``outage_seconds``: every
call is guarded by status and attempt, so a repeat is harmless.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from shared.errors import (
    DatabaseUnavailable,
    RateLimited,
    RetryableError,
    StaleAttempt,
    TerminalError,
)
from shared.outage import call_through_outage
from shared.state_api import (
    Cost,
    StartedTask,
    StateAPI,
    StepDeferral,
    StepFailure,
    StepResult,
    StepSubmission,
    TaskCost,
    TaskRef,
)
from shared.steps import HANDLERS, StepContext, StepHandler, Submitted
from shared.verdicts import Verdict, VerdictWriter

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_TIMEOUT_SECONDS = 300.0
# How long a worker keeps trying to reach an unreachable database before leaving its rows to their
# leases (a Supabase restart takes seconds; a longer outage is not worth holding a worker for).
DEFAULT_OUTAGE_SECONDS = 120.0
# On shutdown: how long to spend handing rows back and writing verdicts already reached.
SHUTDOWN_SECONDS = 5.0


@dataclass
class ChunkReport:
    """What happened to one chunk; ``refused`` rows belonged to another attempt, ``unwritten``
    verdicts could not reach the database (their leases bring the rows back)."""

    completed: int = 0
    submitted: int = 0  # ASYNC: sent to the provider, the row awaits its callback
    retried: int = 0
    deferred: int = 0  # rate limited (429): PENDING again after Retry-After, no attempt used
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
    callback_url: Callable[[TaskRef], str] | None = None,
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
    chunk.callback_url = callback_url
    await chunk.run()
    return report


class _Chunk:
    """The started tasks of one chunk: runs each handler as its own task, hands verdicts to the
    writer as they come, heartbeats the rows it still holds, and cuts off handlers that overrun
    their timeout (a watchdog, so the per-item path costs no extra task or future)."""

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
        # Rows this worker still holds (heartbeated): started, verdict not yet written.
        self._held: dict[TaskRef, None] = {s.task: None for s in runnable}
        self._decided: set[TaskRef] = set()  # reached a verdict: never released
        # What each task's provider calls cost so far: provider -> [units, usd].
        self._charges: dict[TaskRef, dict[str, list[float]]] = {}
        self._running = len(self._runnable)
        self._all_decided = asyncio.Event()
        self._writer = VerdictWriter(
            api,
            report,
            written=self._let_go,
            still_running=lambda: self._running,
            outage_seconds=outage_seconds,
        )
        # Handlers running now, with their deadline; those cut off, and those given up on.
        self._deadlines: dict[asyncio.Task[None], tuple[StartedTask, float]] = {}
        self._cut_off: set[asyncio.Task[None]] = set()
        self._abandoned: set[asyncio.Task[None]] = set()
        # ASYNC steps: the URL a provider answers on, per attempt (None: no receiver runs here).
        self.callback_url: Callable[[TaskRef], str] | None = None

    async def run(self) -> None:
        beat = asyncio.create_task(
            _keep_alive(self._api, self._held, _lease_seconds(self._runnable))
        )
        writer = asyncio.create_task(self._writer.run())
        runners = [asyncio.create_task(self._run_one(s)) for s in self._runnable]
        watchdog = asyncio.create_task(self._watch())
        try:
            await self._all_decided.wait()
            for task in list(self._charges):  # charged after its verdict (an abandoned handler)
                self._writer.add_costs(self._costs(task))
            self._writer.close()
            await _wait_for(writer)
        except asyncio.CancelledError:
            for runner in runners:
                runner.cancel()  # not awaited: a handler may ignore it
            await self._shut_down(writer)
            raise
        finally:
            for helper in (watchdog, beat, writer):
                await cancel_and_wait(helper)

    async def _run_one(self, started: StartedTask) -> None:
        me = asyncio.current_task()
        assert me is not None
        task = started.task
        ctx = StepContext(
            batch_id=task.batch_id,
            item_id=task.item_id,
            step_name=task.step_name,
            attempt=task.attempt,
            config=started.config or {},
            heartbeat=lambda: _heartbeat_one(self._api, task),
            callback_url=None if self.callback_url is None else self.callback_url(task),
            inputs=started.inputs or {},
            charge=self._charger(task),
        )
        async with self._semaphore:
            deadline = asyncio.get_running_loop().time() + _timeout(started)
            self._deadlines[me] = (started, deadline)
            try:
                verdict = await _run_handler(
                    self._handler, started, ctx, lambda: me in self._cut_off
                )
            finally:
                self._deadlines.pop(me, None)
        if me not in self._abandoned:  # else the watchdog has recorded its verdict already
            self._decide(task, verdict)

    async def _watch(self) -> None:
        """Cancel handlers past their deadline; one that ignores it for a tick more is abandoned
        (its verdict recorded here, whatever it does later is ignored)."""
        tick = max(0.05, min(1.0, min(_timeout(s) for s in self._runnable) / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            for runner, (started, deadline) in list(self._deadlines.items()):
                if now < deadline:
                    continue
                if runner not in self._cut_off:
                    self._cut_off.add(runner)
                    runner.cancel()
                elif now >= deadline + tick:
                    self._abandoned.add(runner)
                    del self._deadlines[runner]
                    self._decide(started.task, _timed_out(started))

    def _charger(self, task: TaskRef) -> Callable[[Cost], None]:
        """``ctx.charge`` for ``task``: sums what its calls cost, per provider."""

        def charge(cost: Cost) -> None:
            if not (
                cost.provider
                and math.isfinite(cost.units)
                and math.isfinite(cost.usd)
                and cost.units >= 0
                and cost.usd >= 0
            ):
                raise ValueError(f"a cost needs a provider and finite amounts >= 0, got {cost!r}")
            spent = self._charges.setdefault(task, {}).setdefault(cost.provider, [0.0, 0.0])
            spent[0] += cost.units
            spent[1] += cost.usd

        return charge

    def _costs(self, task: TaskRef) -> list[TaskCost]:
        """What ``task`` was charged, taken (a later charge starts a new record)."""
        return [
            TaskCost(task, provider, units, usd)
            for provider, (units, usd) in self._charges.pop(task, {}).items()
        ]

    def _decide(self, task: TaskRef, verdict: Verdict | None) -> None:
        self._running -= 1
        if self._running == 0:
            self._all_decided.set()
        costs = self._costs(task)
        if verdict is None:  # the attempt turned out stale: another attempt owns the row
            self._report.refused += 1
            self._writer.add_costs(costs)
            self._let_go([task])
            return
        self._decided.add(task)
        self._writer.add(verdict, costs)

    def _let_go(self, tasks: Sequence[TaskRef]) -> None:
        for task in tasks:
            self._held.pop(task, None)
        self._settled(len(tasks))

    async def _shut_down(self, writer: asyncio.Task[None]) -> None:
        """Cancelled: hand back what never reached a verdict, write what did, within a bound."""
        unfinished = [t for t in self._held if t not in self._decided]
        # Calls cut short by the shutdown may have been paid for: into the ledger with the rest.
        for task in list(self._charges):
            self._writer.add_costs(self._costs(task))
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
        self._writer.close()
        await _wait_for(writer, SHUTDOWN_SECONDS)


async def _run_handler(
    handler: StepHandler,
    started_task: StartedTask,
    ctx: StepContext,
    cut_off: Callable[[], bool],
) -> Verdict | None:
    """Run one task and classify the outcome; None: the attempt is stale. ``cut_off()`` tells a
    cancellation by the chunk's watchdog (a timeout) from a shutdown."""
    task = started_task.task
    try:
        # Typed as object: a handler may break its contract, and that must fail the row, not us.
        result: object = await handler(started_task.raw_data or {}, ctx)
    except asyncio.CancelledError:
        if cut_off():
            return _timed_out(started_task)
        raise
    except StaleAttempt:
        return None
    except TerminalError as exc:
        return StepFailure(task, str(exc), retryable=False)
    except RateLimited as exc:
        return StepDeferral(task, exc.provider, exc.retry_after, str(exc))
    except RetryableError as exc:
        return StepFailure(task, str(exc), retryable=True)
    except Exception as exc:  # an unexpected bug or library error: retry, and say what it was
        return StepFailure(task, f"{type(exc).__name__}: {exc}", retryable=True)
    if isinstance(result, Submitted):
        return StepSubmission(task, result.request_id)
    if not isinstance(result, Mapping):
        return StepFailure(
            task,
            f"step {task.step_name} returned {type(result).__name__}, not a JSON object",
            False,
        )
    return StepResult(task, result)


def _timeout(started: StartedTask) -> float:
    return float((started.config or {}).get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS))


def _timed_out(started: StartedTask) -> StepFailure:
    return StepFailure(
        started.task,
        f"timed out after {_timeout(started):g}s (the step's timeout_seconds); cut off",
        retryable=True,
    )


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
    return min((_timeout(s) for s in started), default=DEFAULT_TIMEOUT_SECONDS)


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
