"""Where each batch stands, published from the conductor flow as Prefect artifacts.

For every batch a flow run claims rows of (or is asked about), two artifacts with a key, so they
appear on the Artifacts page of Prefect Cloud or server with a version per run:

- ``batch-<id>``: a table, one row per blueprint step with its counts per status (running and
  awaiting a callback apart, skipped and cached among the completed), and a Markdown description:
  the batch's status, items finished, failures, the rate this run saw and what it spent.
- ``batch-<id>-progress``: a progress bar, the percentage of items finished (completed every step
  or stopped by a failure).

Prefect 3's artifacts API (prefect/artifacts.py, 3.8; docs.prefect.io/v3/develop/artifacts and
the prefect.artifacts API reference): ``acreate_table_artifact`` and ``acreate_progress_artifact``
create a version under a key ("The key must only contain lowercase letters, numbers, and
dashes", validated as ``prefect.types.names.ArtifactKey``: ``^[a-z0-9-]*$``; a UUID's text is
lowercase hex and dashes); ``aupdate_progress_artifact`` updates a progress artifact in place, and
``PrefectClient.update_artifact`` (``ArtifactUpdate``: data, description) does the same for the
table, where the server also updates the key's latest version (server/models/artifacts.py), so
the Artifacts page follows without a new version per update.

Cheap and harmless: one ``batch_progress`` call and two API calls per batch at most every
``every_seconds`` (less often when reading progress is slow: COST_FACTOR; no API call when
nothing changed), at most ``max_batches`` batches per run, and
every failure is logged, never raised: a flow run never fails because Prefect's API could not
take an artifact. The conductor stays data-agnostic: ids, step names and counts only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactUpdate

from shared.conductor import Dispatcher
from shared.state_api import BatchProgress, ClaimedTask, StateAPI

log = logging.getLogger(__name__)

PUBLISH_EVERY_SECONDS = 5.0
# Reading progress costs what the batch's rows cost (batch_progress counts them: about 0.9 s for a
# 1,000,000-item batch here): the next publication waits at least this many times as long as the
# last one took, so publishing takes at most a tenth of the database time it could.
COST_FACTOR = 10.0
MAX_BATCHES = 50
# The last publication when a run ends: bounded, so an unreachable API cannot hold the run.
FINAL_PUBLISH_TIMEOUT_SECONDS = 15.0


def table_key(batch_id: UUID) -> str:
    return f"batch-{batch_id}"


def progress_key(batch_id: UUID) -> str:
    return f"batch-{batch_id}-progress"


def percent_finished(progress: BatchProgress) -> float:
    """Items that completed every step or were stopped by a failure, out of the batch's items."""
    if progress.items <= 0:
        return 100.0
    done = progress.items_completed + progress.items_failed
    return round(min(100.0, 100.0 * done / progress.items), 1)


def step_rows(progress: BatchProgress) -> list[dict[str, Any]]:
    """The table: one row per blueprint step, in blueprint order."""
    return [
        {
            "step": step,
            "pending": counts.get("PENDING", 0),
            "queued": counts.get("QUEUED", 0),
            "running": progress.running(step),
            "awaiting_callback": progress.awaiting.get(step, 0),
            "completed": counts.get("COMPLETED", 0),
            "skipped": progress.skipped.get(step, 0),
            "cached": progress.cached.get(step, 0),
            "failed": counts.get("FAILED", 0),
        }
        for step, counts in progress.steps.items()
    ]


def finished_rows(progress: BatchProgress) -> int:
    """Item-steps done (COMPLETED or FAILED): what a rate counts."""
    return sum(c.get("COMPLETED", 0) + c.get("FAILED", 0) for c in progress.steps.values())


def describe(progress: BatchProgress, rate: float | None) -> str:
    """The table's Markdown description: the batch at a glance."""
    name = progress.name or str(progress.batch_id)
    done = progress.items_completed + progress.items_failed
    lines = [
        f"**{name}**: {progress.status}"
        + (" (cancelled)" if progress.cancelled else "")
        + (" (paused: budget)" if progress.paused else ""),
        "",
        f"- items finished: {done} of {progress.items} ({percent_finished(progress)}%): "
        f"{progress.items_completed} completed every step, {progress.items_failed} failed",
    ]
    failures = {step: c.get("FAILED", 0) for step, c in progress.steps.items() if c.get("FAILED")}
    if failures:
        lines.append("- failures by step: " + ", ".join(f"{s} {n}" for s, n in failures.items()))
    if rate is not None:
        lines.append(f"- rate in this run: {rate:.1f} item-steps/s")
    if progress.cost.paid_steps:
        budget = progress.cost.budget_usd
        lines.append(
            f"- spent: ${progress.cost.spent_usd:.2f}"
            + (f" of a ${budget:.2f} budget" if budget is not None else "")
        )
    return "\n".join(lines)


@dataclass
class _Published:
    table_id: UUID
    progress_id: UUID
    state: dict[str, Any]
    first_rows: int
    first_at: float


class BatchArtifacts:
    """Publishes (and keeps updating) the artifacts of the batches it watches."""

    def __init__(
        self,
        api: StateAPI,
        *,
        every_seconds: float = PUBLISH_EVERY_SECONDS,
        max_batches: int = MAX_BATCHES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._every = every_seconds
        self._max_batches = max_batches
        self._clock = clock
        self._watched: dict[UUID, None] = {}  # insertion-ordered set
        self._published: dict[UUID, _Published] = {}
        self._last_publish: float | None = None
        self._wait = every_seconds
        self._warned_full = False

    @property
    def watched(self) -> list[UUID]:
        return list(self._watched)

    def watch(self, batch_ids: Iterable[UUID]) -> None:
        for batch_id in batch_ids:
            if batch_id in self._watched:
                continue
            if len(self._watched) >= self._max_batches:
                if not self._warned_full:
                    log.info("progress artifacts: %d batches watched, no more", self._max_batches)
                    self._warned_full = True
                return
            self._watched[batch_id] = None

    async def publish(self, *, force: bool = False) -> int:
        """Publish every watched batch whose progress changed, unless the last publication was
        less than ``every_seconds`` ago (``force``: now). Returns how many were published."""
        now = self._clock()
        if not force and self._last_publish is not None and now - self._last_publish < self._wait:
            return 0
        self._last_publish = now
        published = 0
        for batch_id in list(self._watched):
            try:
                published += await self._publish_one(batch_id, now)
            except Exception as exc:  # never fail the flow over an artifact
                log.warning("progress artifact for batch %s not published: %s", batch_id, exc)
        self._wait = max(self._every, COST_FACTOR * (self._clock() - now))
        return published

    async def keep_publishing(self) -> None:
        """Publish every ``every_seconds`` (or less often, see COST_FACTOR) until cancelled."""
        while True:
            await asyncio.sleep(self._wait)
            await self.publish()

    async def publish_final(self) -> None:
        """The run's last word, bounded in time and never raising."""
        try:
            await asyncio.wait_for(self.publish(force=True), FINAL_PUBLISH_TIMEOUT_SECONDS)
        except Exception as exc:
            log.warning("progress artifacts not published at the end of the run: %s", exc)

    async def _publish_one(self, batch_id: UUID, now: float) -> int:
        progress = await self._api.batch_progress(batch_id)
        state = progress.to_json()
        seen = self._published.get(batch_id)
        if seen is not None and seen.state == state:
            return 0
        rows = finished_rows(progress)
        rate = None
        if seen is not None and now > seen.first_at:
            rate = (rows - seen.first_rows) / (now - seen.first_at)
        table = step_rows(progress)
        description = describe(progress, rate)
        percent = percent_finished(progress)
        if seen is None:
            table_id = await acreate_table_artifact(
                table=table, key=table_key(batch_id), description=description
            )
            progress_id = await acreate_progress_artifact(
                progress=percent,
                key=progress_key(batch_id),
                description=f"{progress.name or batch_id}: items finished",
            )
            self._published[batch_id] = _Published(table_id, progress_id, state, rows, now)
            return 1
        async with get_client() as client:
            # TableArtifact's own encoding of its data (prefect/artifacts.py: json.dumps).
            await client.update_artifact(
                seen.table_id, ArtifactUpdate(data=json.dumps(table), description=description)
            )
            await aupdate_progress_artifact(seen.progress_id, percent, client=client)
        seen.state = state
        return 1


class WatchingDispatcher:
    """A dispatcher that tells ``watch`` which batches the rows it is handed belong to."""

    def __init__(self, inner: Dispatcher, watch: Callable[[Iterable[UUID]], None]) -> None:
        self._inner = inner
        self._watch = watch

    def capacity(self) -> int | None:
        return self._inner.capacity()

    async def dispatch(self, function_name: str, claimed: Sequence[ClaimedTask]) -> None:
        self._watch(dict.fromkeys(c.task.batch_id for c in claimed))
        await self._inner.dispatch(function_name, claimed)
