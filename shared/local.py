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
from shared.errors import DatabaseUnavailable
from shared.outage import DatabaseGone, Outage
from shared.owner import host_owners_prefix, owner_gone, process_owner
from shared.state_api import ClaimedTask, StateAPI, TaskRef
from shared.steps import StepHandler
from shared.worker import DEFAULT_OUTAGE_SECONDS, ChunkReport, cancel_and_wait, run_chunk

log = logging.getLogger(__name__)

CHANNEL = "enrichment_state_changed"
MIN_CHUNK = 50
# How long stopping may take to hand rows back (the database may be the reason we stop).
STOP_SECONDS = 6.0
# How often to look for rows held by stopped processes of this machine (at start, then on a sweep
# at most this often: a process that dies while we run is rare, and the lease expiry covers it).
RECLAIM_INTERVAL = 15.0
# After a pass that claimed rows, the next comes within this long even if nothing wakes the loop:
# rows a provider's bucket held back become claimable as it refills, and no notification says so.
# Each pass that claims nothing doubles the wait, up to the sweep interval.
IDLE_POLL_SECONDS = 0.05


@dataclass
class PoolStats:
    chunks: int = 0
    completed: int = 0
    submitted: int = 0
    retried: int = 0
    deferred: int = 0
    failed: int = 0
    refused: int = 0
    released: int = 0

    def add(self, report: ChunkReport) -> None:
        self.chunks += 1
        self.completed += report.completed
        self.submitted += report.submitted
        self.retried += report.retried
        self.deferred += report.deferred
        self.failed += report.failed
        self.refused += report.refused
        self.released += report.released


class LocalDispatcher:
    """A bounded in-process worker pool. Each dispatched chunk starts at once as its own task, and
    a row's slot is freed as soon as its verdict is written: a slow or hung call holds its own
    slot (until its step's timeout cuts it off), never a whole chunk or a worker. ``capacity()``
    keeps the conductor from claiming more than the pool can start now, so claimed rows never sit
    QUEUED in a local queue while their leases run out."""

    def __init__(
        self,
        api: StateAPI,
        *,
        max_in_flight: int = 1000,
        chunk_size: int = 250,
        workers: int = 4,
        handlers: Mapping[str, StepHandler] | None = None,
        on_chunk_done: Callable[[], None] | None = None,
        outage_seconds: float | None = DEFAULT_OUTAGE_SECONDS,
        callback_url: Callable[[TaskRef], str] | None = None,
    ) -> None:
        if max_in_flight < 1 or chunk_size < 1 or workers < 1:
            raise ValueError("max_in_flight, chunk_size and workers must be at least 1")
        self._api = api
        self._max_in_flight = max_in_flight
        self._chunk_size = chunk_size
        self._worker_count = workers
        self._handlers = handlers
        self._callback_url = callback_url
        self._on_chunk_done = on_chunk_done
        self._outage_seconds = outage_seconds
        self._chunks: set[asyncio.Task[None]] = set()
        self._in_flight = 0
        self.stats = PoolStats()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def capacity(self) -> int:
        return max(self._max_in_flight - self._in_flight, 0)

    async def dispatch(self, function_name: str, claimed: Sequence[ClaimedTask]) -> None:
        tasks = [c.task for c in claimed]
        # Spread a wave over `workers` chunks so their database calls overlap, but never into
        # chunks so small that per-statement overhead dominates.
        spread = -(-len(tasks) // self._worker_count)
        size = min(self._chunk_size, max(spread, MIN_CHUNK))
        for i in range(0, len(tasks), size):
            chunk = tasks[i : i + size]
            self._in_flight += len(chunk)
            runner = asyncio.create_task(self._run(function_name, chunk), name="enrich-chunk")
            self._chunks.add(runner)
            runner.add_done_callback(self._chunks.discard)

    async def stop(self, timeout: float = STOP_SECONDS, *, quiet: bool = False) -> None:
        """Cancel running chunks: each hands back its unfinished rows and writes the verdicts it
        has. Waits at most ``timeout``: a chunk that cannot finish by then (the database is down)
        is left behind, and its rows come back when their leases expire or the next run of this
        batch finds their holder gone. ``quiet``: the caller already said the database is gone."""
        chunks = set(self._chunks)
        if quiet:
            self._hush_hand_backs()
        for chunk in chunks:
            chunk.cancel()
        if not chunks:
            return
        _, late = await asyncio.wait(chunks, timeout=timeout)
        if late:
            log.log(
                logging.DEBUG if quiet else logging.WARNING,
                "%d chunks did not stop within %.0fs; left to their leases",
                len(late),
                timeout,
            )

    @staticmethod
    def _hush_hand_backs() -> None:
        """The database is gone for good and the caller said so, with the resume command: each
        cancelled chunk's "could not hand back N rows" would only repeat it (and the next run
        takes those rows back at once). Left in place: the process is ending, and late chunks
        may still log."""
        logging.getLogger("shared.worker").addFilter(
            lambda record: not record.getMessage().startswith("could not hand back")
        )

    async def _run(self, function_name: str, chunk: list[TaskRef]) -> None:
        report = ChunkReport()
        holding = len(chunk)

        def settled(n: int) -> None:
            nonlocal holding
            n = min(n, holding)
            holding -= n
            self._in_flight -= n
            if n and self._on_chunk_done is not None:
                self._on_chunk_done()

        try:
            await run_chunk(
                self._api,
                function_name,
                chunk,
                handlers=self._handlers,
                concurrency=len(chunk),  # the pool's bound is max_in_flight, not a per-chunk one
                on_settled=settled,
                outage_seconds=self._outage_seconds,
                report=report,
                callback_url=self._callback_url,
            )
        except DatabaseUnavailable as exc:
            log.warning("%d %s rows left to their leases: %s", len(chunk), function_name, exc)
        except Exception:
            log.exception("chunk of %d %s tasks failed", len(chunk), function_name)
        finally:
            self.stats.add(report)
            settled(holding)


@dataclass
class RunnerStats:
    passes: int = 0
    notifications: int = 0
    claimed: int = 0
    swept: int = 0
    reclaimed: int = 0


class LocalRunner:
    """The conductor loop plus a local worker pool, until ``stop()`` or ``until()`` says done.

    The database going away (a restart, a failover, maintenance) is ridden out: passes are retried
    with backoff while the workers keep their verdicts and write them once it is back. After
    ``outage_seconds`` without it (None: never), ``run`` raises ``DatabaseGone``; at once when
    ``stopped_by()`` says why it is gone for good (the private cluster stopped by
    ``enrich db down``: nobody will bring it back while we wait).
    """

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
        outage_seconds: float | None = DEFAULT_OUTAGE_SECONDS,
        callback_url: Callable[[TaskRef], str] | None = None,
        stopped_by: Callable[[], str | None] | None = None,
    ) -> None:
        self._dsn = dsn
        self._stopped_by = stopped_by
        self._gone: str | None = None  # why the database is gone for good, once known
        self._api = api
        self._batch_ids = list(batch_ids) if batch_ids else None
        self._claim_limit = claim_limit
        self._sweep_interval = sweep_interval
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._listening = asyncio.Event()
        self.owner = process_owner()
        self._last_reclaim = float("-inf")
        self._idle_poll = IDLE_POLL_SECONDS
        self.outage = Outage(outage_seconds)
        self.dispatcher = LocalDispatcher(
            api,
            max_in_flight=max_in_flight,
            chunk_size=chunk_size,
            workers=workers,
            handlers=handlers,
            on_chunk_done=self._wake.set,
            outage_seconds=outage_seconds,
            callback_url=callback_url,
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
        last_sweep = float("-inf")
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                now = time.monotonic()
                sweep = now - last_sweep >= self._sweep_interval
                try:
                    done = await self._unless_stopped(self._pass_and_check(sweep, until))
                except DatabaseUnavailable as exc:
                    await self._wait_out(exc)
                    continue
                if done is None:  # stopped mid-pass
                    break
                if sweep:
                    last_sweep = now
                self._recovered()
                if done:
                    break
                timeout = max(self._sweep_interval - (time.monotonic() - last_sweep), 0.0)
                await self._sleep(min(timeout, self._idle_poll))
        finally:
            await cancel_and_wait(listener)
            # While the database is away there is no one to hand rows back to: do not wait for it.
            away = self.outage.ongoing or self._gone is not None
            stop_timeout = 1.0 if away else STOP_SECONDS
            await asyncio.shield(self.dispatcher.stop(stop_timeout, quiet=self._gone is not None))
        if self._gone is not None:
            raise DatabaseGone(self._gone)
        return self.stats

    async def _pass_and_check(
        self, sweep: bool, until: Callable[[], Awaitable[bool]] | None
    ) -> bool:
        report = await self._pass(sweep)
        return (
            until is not None
            and report.claimed == 0
            and self.dispatcher.in_flight == 0
            and await until()
        )

    async def _unless_stopped(self, call: Awaitable[bool]) -> bool | None:
        """``await call``, cancelled by ``stop()``: a pass waiting on an unreachable database
        must not hold up Ctrl-C. None when stopped first."""
        task = asyncio.ensure_future(call)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            stopping.cancel()
        if not task.done():
            await cancel_and_wait(task)
            return None
        return task.result()

    async def _wait_out(self, exc: DatabaseUnavailable) -> None:
        """A pass failed for want of the database: wait before the next (raises DatabaseGone once
        the outage has lasted too long)."""
        first = not self.outage.ongoing
        delay = self.outage.failed(exc)
        if self._gone_for_good():
            raise DatabaseGone(str(self._gone)) from exc
        if first:
            limit = self.outage.limit_seconds
            log.warning(
                "database unavailable (%s); reconnecting%s",
                exc,
                f", for up to {limit:.0f}s" if limit is not None else "",
            )
        await self._sleep(delay)

    def _gone_for_good(self) -> bool:
        """Whether ``stopped_by`` says the database will not come back (then remember why)."""
        why = self._stopped_by() if self._stopped_by is not None else None
        if why is not None:
            self._gone = why
        return why is not None

    def _recovered(self) -> None:
        lasted = self.outage.recovered()
        if lasted is not None:
            log.warning("database back after %.1fs; carrying on", lasted)

    async def _sleep(self, seconds: float) -> None:
        """Sleep until woken (a notification, freed capacity, stop) or ``seconds`` pass."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), seconds)

    async def _pass(self, sweep: bool) -> PassReport:
        if sweep and time.monotonic() - self._last_reclaim >= RECLAIM_INTERVAL:
            self.stats.reclaimed += await self._reclaim_orphans()
            self._last_reclaim = time.monotonic()
        report = await conduct(
            self._api,
            self.dispatcher,
            claim_limit=self._claim_limit,
            batch_ids=self._batch_ids,
            sweep=sweep,
            owner=self.owner,
        )
        self.stats.passes += 1
        self.stats.claimed += report.claimed
        self.stats.swept += report.swept
        self._idle_poll = (
            IDLE_POLL_SECONDS if report.claimed else min(self._idle_poll * 2, self._sweep_interval)
        )
        return report

    async def _reclaim_orphans(self) -> int:
        """Take back, now, rows leased by processes of this machine that are gone (kill -9, a
        crash): never-started rows get their attempt back, instead of all waiting out a lease."""
        owners = await self._api.lease_owners(host_owners_prefix(), self._batch_ids)
        gone = [o for o in owners if o != self.owner and owner_gone(o)]
        if not gone:
            return 0
        rows = await self._api.reclaim_orphaned(gone, batch_ids=self._batch_ids)
        if rows:
            log.warning("took back %d rows from %d stopped process(es)", len(rows), len(gone))
        return len(rows)

    def _relevant(self, payload: str) -> bool:
        """Whether a notification is worth a pass now. The payload is a wake-up hint only: any
        session may NOTIFY this channel with any text, so it decides nothing but when to look;
        the pass reads every row from the tables. A forged one costs an idle pass, and it cannot
        hide a real one (each statement sends its own, and the timer sweeps anyway)."""
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
                    self._dsn, autocommit=True, connect_timeout=10
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
            except Exception as exc:
                # Expected while the database restarts; the passes report outages to the user.
                self._listening.clear()
                if self._gone_for_good():
                    # Stopped on purpose: end now, not when a pass gives up waiting for the pool.
                    self.stop()
                    return
                log.debug("lost the LISTEN connection (%s); reconnecting in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
