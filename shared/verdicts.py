"""Writing a chunk's verdicts as they arrive: completions and failures in bulk, none held back.

A worker hands each verdict to a ``VerdictWriter`` the moment its handler finishes. The writer
sends whatever has gathered in one ``complete`` and one ``fail`` call, after giving verdicts of
tasks still running a moment (``FLUSH_DELAY_SECONDS``) to join, so a chunk of fast steps is written
in one round trip and a slow task never keeps its chunk-mates' results back (nor lets their leases
lapse while they wait). While the database is unreachable, writes are repeated for up to
``outage_seconds``: the calls are guarded by status and attempt, so a repeat is harmless.

What the tasks' provider calls cost goes first, in one ``record_costs`` call per flush: every paid
call lands in the ledger before its result is trusted. If the costs cannot be written, neither are
the verdicts of that flush (their leases bring the rows back). Recording is idempotent, so a
repeat after a lost answer counts nothing twice. A 429 (``StepDeferral``) is written with ``defer``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

from shared.errors import DatabaseUnavailable
from shared.outage import call_through_outage
from shared.state_api import (
    StateAPI,
    StepDeferral,
    StepFailure,
    StepResult,
    StepSubmission,
    TaskCost,
    TaskRef,
)

log = logging.getLogger(__name__)

# A verdict waits at most this long for others of its chunk to share its write...
FLUSH_DELAY_SECONDS = 0.05
# ...and a write carries at most this many rows.
FLUSH_MAX_ROWS = 500

# A result, a failure, a 429 (back to PENDING after Retry-After), or (ASYNC steps) the provider's
# receipt: the answer comes by callback.
Verdict = StepResult | StepFailure | StepDeferral | StepSubmission


class Tally(Protocol):
    """Where the writer counts what the database did (``shared.worker.ChunkReport``)."""

    completed: int
    submitted: int
    retried: int
    deferred: int
    failed: int
    refused: int
    unwritten: int
    errors: list[str]


class VerdictWriter:
    """Buffers verdicts and writes them in a background loop (``run``) until ``close()``d and
    drained. ``written(tasks)`` is called for every row once it left the buffer, written or not."""

    def __init__(
        self,
        api: StateAPI,
        tally: Tally,
        *,
        written: Callable[[Sequence[TaskRef]], None],
        still_running: Callable[[], int],
        outage_seconds: float | None,
    ) -> None:
        self._api = api
        self._tally = tally
        self._written = written
        self._still_running = still_running
        self._outage_seconds = outage_seconds
        self._verdicts: list[Verdict] = []
        self._costs: list[TaskCost] = []
        self._added = asyncio.Event()
        self._closing = False

    def add(self, verdict: Verdict, costs: Sequence[TaskCost] = ()) -> None:
        """Buffer a verdict, with what its task's provider calls cost (written first)."""
        self._costs.extend(costs)
        self._verdicts.append(verdict)
        self._added.set()

    def add_costs(self, costs: Sequence[TaskCost]) -> None:
        """Costs of a task without a verdict to write (a stale attempt, a shutdown): a call that
        was made was paid for."""
        if costs:
            self._costs.extend(costs)
            self._added.set()

    def close(self) -> None:
        """No more verdicts will come: write what is buffered, then stop."""
        self._closing = True
        self._added.set()

    async def run(self) -> None:
        while True:
            if not self._verdicts and not self._costs:
                if self._closing:
                    return
                self._added.clear()
                await self._added.wait()
                continue
            await self._linger()
            batch, self._verdicts = self._verdicts[:FLUSH_MAX_ROWS], self._verdicts[FLUSH_MAX_ROWS:]
            # Every buffered cost: those of this batch's verdicts, and perhaps some of the next
            # (recorded a moment early, never late).
            costs, self._costs = self._costs, []
            await self._write(batch, costs)

    async def _linger(self) -> None:
        """Give verdicts of tasks still running a moment to join this write."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FLUSH_DELAY_SECONDS
        while self._still_running() and len(self._verdicts) < FLUSH_MAX_ROWS and not self._closing:
            left = deadline - loop.time()
            if left <= 0:
                return
            self._added.clear()
            try:
                await asyncio.wait_for(self._added.wait(), left)
            except asyncio.TimeoutError:
                return

    async def _write(self, batch: Sequence[Verdict], costs: Sequence[TaskCost] = ()) -> None:
        results = [v for v in batch if isinstance(v, StepResult)]
        failures = [v for v in batch if isinstance(v, StepFailure)]
        deferrals = [v for v in batch if isinstance(v, StepDeferral)]
        submissions = [v for v in batch if isinstance(v, StepSubmission)]
        try:
            if costs:
                await self._record(costs)
            if results:
                await self._complete(results)
            if failures:
                await self._fail(failures)
            if deferrals:
                await self._defer(deferrals)
            if submissions:
                await self._submit(submissions)
        except DatabaseUnavailable as exc:
            # Given up: the rows stay leased to this attempt, and once the heartbeat stops their
            # leases expire and the sweep retries them.
            self._tally.unwritten += len(batch)
            log.warning("could not write %d verdicts: %s", len(batch), exc)
        finally:
            self._written([v.task for v in batch])

    async def _record(self, costs: Sequence[TaskCost]) -> None:
        await call_through_outage(
            lambda: self._api.record_costs(costs),
            limit_seconds=self._outage_seconds,
            what="record costs",
        )

    async def _defer(self, deferrals: Sequence[StepDeferral]) -> None:
        outcomes = await call_through_outage(
            lambda: self._api.defer(deferrals),
            limit_seconds=self._outage_seconds,
            what="defer rate-limited steps",
        )
        for outcome in outcomes:
            if not outcome.ok:
                self._tally.refused += 1
            elif outcome.status == "PENDING":
                self._tally.deferred += 1
            else:
                self._tally.failed += 1

    async def _complete(self, results: Sequence[StepResult]) -> None:
        outcomes = await call_through_outage(
            lambda: self._api.complete(results),
            limit_seconds=self._outage_seconds,
            what="complete steps",
        )
        accepted = sum(o.ok for o in outcomes)
        self._tally.completed += accepted
        self._tally.refused += len(outcomes) - accepted

    async def _submit(self, submissions: Sequence[StepSubmission]) -> None:
        outcomes = await call_through_outage(
            lambda: self._api.submit(submissions),
            limit_seconds=self._outage_seconds,
            what="record submissions",
        )
        # wrong_status: the callback was applied before the submission was recorded. Fine.
        self._tally.submitted += sum(o.ok for o in outcomes)

    async def _fail(self, failures: Sequence[StepFailure]) -> None:
        outcomes = await call_through_outage(
            lambda: self._api.fail(failures),
            limit_seconds=self._outage_seconds,
            what="fail steps",
        )
        for outcome in outcomes:
            if not outcome.ok:
                self._tally.refused += 1
            elif outcome.status == "PENDING":
                self._tally.retried += 1
            else:
                self._tally.failed += 1
        self._tally.errors.extend(f.error for f in failures[:5])
