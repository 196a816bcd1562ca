"""Offline execution: a local worker pool and the conductor loop woken by ``pg_notify``.

``LocalDispatcher`` runs claimed rows in this process through ``shared.worker.run_chunk``, the same
entry point the Modal functions call. ``LocalRunner`` is the event loop of ``enrich run`` and
``enrich serve``: it runs a conductor pass whenever the database says something became ready or
finished (LISTEN), whenever local workers free capacity, and on a timer (the sweep), so a lost
notification only delays work, never loses it. A burst of notifications sets one event, so
thousands of them become a handful of passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from uuid import UUID

import psycopg

from shared.conductor import PassReport, conduct
from shared.state_api import ClaimedTask, StateAPI, TaskRef
from shared.steps import StepHandler
from shared.worker import ChunkReport, run_chunk

log = logging.getLogger(__name__)

CHANNEL = "enrichment_state_changed"
MIN_CHUNK = 50


@dataclass
class PoolStats:
    chunks: int = 0
    completed: int = 0
    retried: int = 0
    failed: int = 0
    refused: int = 0
    released: int = 0

    def add(self, report: ChunkReport) -> None:
        self.chunks += 1
        self.completed += report.completed
        self.retried += report.retried
        self.failed += report.failed
        self.refused += report.refused
        self.released += report.released


class LocalDispatcher:
    """A bounded in-process worker pool. ``capacity()`` keeps the conductor from claiming more than
    the pool can start soon, so claimed rows do not sit QUEUED while their leases run out."""

    def __init__(
        self,
        api: StateAPI,
        *,
        max_in_flight: int = 1000,
        chunk_size: int = 250,
        workers: int = 4,
        handlers: Mapping[str, StepHandler] | None = None,
        on_chunk_done: Callable[[], None] | None = None,
    ) -> None:
        if max_in_flight < 1 or chunk_size < 1 or workers < 1:
            raise ValueError("max_in_flight, chunk_size and workers must be at least 1")
        self._api = api
        self._max_in_flight = max_in_flight
        self._chunk_size = chunk_size
        self._worker_count = workers
        self._handlers = handlers
        self._on_chunk_done = on_chunk_done
        self._queue: asyncio.Queue[tuple[str, list[TaskRef]]] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._in_flight = 0
        self.stats = PoolStats()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def capacity(self) -> int:
        return max(self._max_in_flight - self._in_flight, 0)

    async def dispatch(self, function_name: str, claimed: Sequence[ClaimedTask]) -> None:
        tasks = [c.task for c in claimed]
        # Spread a wave over the workers so their database calls overlap, but never into chunks so
        # small that per-statement overhead dominates.
        spread = -(-len(tasks) // self._worker_count)
        size = min(self._chunk_size, max(spread, MIN_CHUNK))
        for i in range(0, len(tasks), size):
            chunk = tasks[i : i + size]
            self._in_flight += len(chunk)
            self._queue.put_nowait((function_name, chunk))

    def start(self) -> None:
        if not self._workers:
            self._workers = [
                asyncio.create_task(self._work(), name=f"enrich-worker-{i}")
                for i in range(self._worker_count)
            ]

    async def stop(self) -> None:
        """Cancel running chunks (they release their unfinished rows) and release queued ones."""
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await worker
        self._workers = []
        queued: list[TaskRef] = []
        while not self._queue.empty():
            _, chunk = self._queue.get_nowait()
            queued.extend(chunk)
        if queued:
            outcomes = await self._api.release(queued, "worker pool stopped before starting it")
            self.stats.released += sum(o.ok for o in outcomes)
            self._in_flight -= len(queued)

    async def _work(self) -> None:
        while True:
            function_name, chunk = await self._queue.get()
            try:
                report = await run_chunk(self._api, function_name, chunk, handlers=self._handlers)
                self.stats.add(report)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The database was unreachable mid-chunk: the rows' leases will bring them back.
                log.exception("chunk of %d %s tasks failed", len(chunk), function_name)
            finally:
                self._in_flight -= len(chunk)
                if self._on_chunk_done is not None:
                    self._on_chunk_done()


@dataclass
class RunnerStats:
    passes: int = 0
    notifications: int = 0
    claimed: int = 0
    swept: int = 0


class LocalRunner:
    """The conductor loop plus a local worker pool, until ``stop()`` or ``until()`` says done."""

    def __init__(
        self,
        dsn: str,
        api: StateAPI,
        *,
        batch_ids: Sequence[UUID] | None = None,
        max_in_flight: int = 600,
        chunk_size: int = 150,
        workers: int = 4,
        claim_limit: int = 600,
        sweep_interval: float = 5.0,
        handlers: Mapping[str, StepHandler] | None = None,
    ) -> None:
        self._dsn = dsn
        self._api = api
        self._batch_ids = list(batch_ids) if batch_ids else None
        self._claim_limit = claim_limit
        self._sweep_interval = sweep_interval
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._listening = asyncio.Event()
        self.dispatcher = LocalDispatcher(
            api,
            max_in_flight=max_in_flight,
            chunk_size=chunk_size,
            workers=workers,
            handlers=handlers,
            on_chunk_done=self._wake.set,
        )
        self.stats = RunnerStats()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    async def wait_listening(self, timeout: float = 10.0) -> None:
        """Until the LISTEN connection is up (tests use this before sending notifications)."""
        await asyncio.wait_for(self._listening.wait(), timeout)

    async def run(self, until: Callable[[], Awaitable[bool]] | None = None) -> RunnerStats:
        """Run passes until stopped, or until ``until()`` is true while nothing is in flight."""
        listener = asyncio.create_task(self._listen(), name="enrich-listen")
        self.dispatcher.start()
        last_sweep = float("-inf")
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                now = time.monotonic()
                sweep = now - last_sweep >= self._sweep_interval
                if sweep:
                    last_sweep = now
                report = await self._pass(sweep)
                if (
                    until is not None
                    and report.claimed == 0
                    and self.dispatcher.in_flight == 0
                    and await until()
                ):
                    break
                timeout = max(self._sweep_interval - (time.monotonic() - last_sweep), 0.0)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener
            await asyncio.shield(self.dispatcher.stop())
        return self.stats

    async def _pass(self, sweep: bool) -> PassReport:
        report = await conduct(
            self._api,
            self.dispatcher,
            claim_limit=self._claim_limit,
            batch_ids=self._batch_ids,
            sweep=sweep,
        )
        self.stats.passes += 1
        self.stats.claimed += report.claimed
        self.stats.swept += report.swept
        return report

    def _relevant(self, payload: str) -> bool:
        if self._batch_ids is None:
            return True
        try:
            data = json.loads(payload)
            named = {UUID(b) for b in data.get("batch_ids", [])}
        except (ValueError, TypeError, AttributeError):
            return True  # unreadable: waking costs one pass, missing it could cost a wait
        return bool(data.get("more_batches")) or any(b in named for b in self._batch_ids)

    async def _listen(self) -> None:
        """LISTEN with reconnects; the timer keeps work moving while the connection is down."""
        delay = 0.5
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self._dsn, autocommit=True
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._listening.set()
                    delay = 0.5
                    # A notification may have been missed while (re)connecting: look once.
                    self._wake.set()
                    async for note in conn.notifies():
                        self.stats.notifications += 1
                        if self._relevant(note.payload):
                            self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._listening.clear()
                log.warning(
                    "lost the LISTEN connection; reconnecting in %.1fs", delay, exc_info=True
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
