"""The State API: the narrow interface between the database and everything that moves state.

The conductor, the workers and the CLI talk to the database only through ``StateAPI``. Each method
is one call to a SQL function of ``supabase/migrations`` (the functions hold the logic; the
implementations only carry arguments and map errors), so the PostgreSQL implementation and the
Supabase (PostgREST) implementation are interchangeable and pass the same contract tests.

Worker calls are fenced: they name the attempt they were dispatched for, and the database refuses a
call for any other attempt or in the wrong status. A refusal is not an exception: it comes back as
an ``Outcome`` per row, because in bulk calls some rows may be accepted and others not.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

STATUSES = ("PENDING", "QUEUED", "IN_PROGRESS", "COMPLETED", "FAILED")
ACTIVE_STATUSES = ("PENDING", "QUEUED", "IN_PROGRESS")


class Outcome(str, enum.Enum):
    """What the database did with one row of a worker call."""

    OK = "ok"
    NOT_FOUND = "not_found"
    STALE_ATTEMPT = "stale_attempt"
    WRONG_STATUS = "wrong_status"


@dataclass(frozen=True, slots=True)
class TaskRef:
    """One attempt at one step of one item: everything a worker receives."""

    batch_id: UUID
    item_id: UUID
    step_name: str
    attempt: int

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_id": str(self.batch_id),
            "item_id": str(self.item_id),
            "step_name": self.step_name,
            "attempt": self.attempt,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskRef:
        return cls(
            batch_id=UUID(str(data["batch_id"])),
            item_id=UUID(str(data["item_id"])),
            step_name=str(data["step_name"]),
            attempt=int(data["attempt"]),
        )


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    """A row the conductor claimed (now QUEUED) and must dispatch."""

    task: TaskRef
    function_name: str
    step_type: str
    lease_expires_at: datetime


@dataclass(frozen=True, slots=True)
class TaskOutcome:
    task: TaskRef
    outcome: Outcome

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


@dataclass(frozen=True, slots=True)
class StartedTask:
    """The answer to starting a task: the item's input and the step's config when accepted, and
    the results of the earlier steps its config ``needs`` (``{step: result}``)."""

    task: TaskRef
    outcome: Outcome
    raw_data: Mapping[str, Any] | None = None
    config: Mapping[str, Any] | None = None
    inputs: Mapping[str, Mapping[str, Any]] | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


@dataclass(frozen=True, slots=True)
class FailOutcome:
    task: TaskRef
    outcome: Outcome
    status: str | None  # the row's status afterwards: PENDING (will retry) or FAILED

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.OK


@dataclass(frozen=True, slots=True)
class StepResult:
    task: TaskRef
    result: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Cost:
    """What one provider call cost: ``units`` in the provider's terms (searches, credits) and
    ``usd``. A call served from the cache costs nothing and records no Cost."""

    provider: str
    units: float
    usd: float


@dataclass(frozen=True, slots=True)
class StepFailure:
    task: TaskRef
    error: str
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class StepSubmission:
    """An ASYNC step sent to its provider, which will answer by callback; ``request_id`` is the
    provider's name for the request (for tracing)."""

    task: TaskRef
    request_id: str


@dataclass(frozen=True, slots=True)
class SweptRow:
    """A row whose lease expired: now PENDING (retry scheduled) or FAILED (attempts exhausted)."""

    task: TaskRef
    status: str


@dataclass(frozen=True, slots=True)
class BatchProgress:
    batch_id: UUID
    name: str | None
    status: str
    items: int
    cancelled: bool
    # step -> status -> count, every blueprint step (in blueprint order) and every status present.
    steps: dict[str, dict[str, int]] = field(default_factory=dict)
    # step -> IN_PROGRESS rows of an ASYNC step awaiting their callback (no worker holds them).
    awaiting: dict[str, int] = field(default_factory=dict)

    def running(self, step: str) -> int:
        """IN_PROGRESS rows of ``step`` that a worker is running (not awaiting a callback)."""
        return self.steps[step]["IN_PROGRESS"] - self.awaiting.get(step, 0)

    @property
    def items_completed(self) -> int:
        """Items that completed every step of the blueprint."""
        if not self.steps:
            return 0
        return next(reversed(self.steps.values()))["COMPLETED"]

    @property
    def items_failed(self) -> int:
        """Items stopped by a FAILED step (an item fails at most one step: progression stops)."""
        return sum(counts["FAILED"] for counts in self.steps.values())

    @property
    def finished(self) -> bool:
        return self.status in ("COMPLETED", "FAILED") and not any(
            counts[s] for counts in self.steps.values() for s in ACTIVE_STATUSES
        )

    def to_json(self) -> dict[str, Any]:
        """The documented shape of ``enrich status --json``, plus ``awaiting_callback``: per
        step, the IN_PROGRESS rows that wait for their provider's callback."""
        return {
            "batch_id": str(self.batch_id),
            "status": self.status,
            "items": self.items,
            "steps": {step: dict(counts) for step, counts in self.steps.items()},
            "awaiting_callback": {step: self.awaiting.get(step, 0) for step in self.steps},
        }


class StateAPI(Protocol):
    """Every state change of the orchestrator. Implementations: ``shared.pg_state.PgStateAPI``."""

    async def close(self) -> None:
        """Release connections."""
        ...

    async def create_batch(
        self,
        blueprint: Sequence[str],
        items: Sequence[Mapping[str, Any]],
        *,
        client_id: UUID | None = None,
        name: str | None = None,
    ) -> UUID:
        """Create a batch; every item's first step starts PENDING. Raises InvalidInput."""
        ...

    async def claim(
        self,
        limit: int,
        *,
        step_names: Sequence[str] | None = None,
        batch_ids: Sequence[UUID] | None = None,
        owner: str | None = None,
    ) -> list[ClaimedTask]:
        """Claim up to ``limit`` ready rows (QUEUED, attempt + 1); claimers never overlap. Rows of
        a cancelled batch are never claimed. ``owner`` records who holds the leases (see
        ``shared.owner``), for ``reclaim_orphaned``."""
        ...

    async def start(self, tasks: Sequence[TaskRef]) -> list[StartedTask]:
        """QUEUED -> IN_PROGRESS; returns each accepted item's raw_data and step config."""
        ...

    async def complete(self, results: Sequence[StepResult]) -> list[TaskOutcome]:
        """IN_PROGRESS -> COMPLETED with the result written; seeds the next blueprint step."""
        ...

    async def fail(self, failures: Sequence[StepFailure]) -> list[FailOutcome]:
        """Retry with backoff while attempts remain (and the error is retryable), else FAILED."""
        ...

    async def submit(self, submissions: Sequence[StepSubmission]) -> list[TaskOutcome]:
        """IN_PROGRESS rows of ASYNC steps now await their callback: the lease becomes the
        callback deadline and no worker holds it. ``wrong_status`` when the callback came first."""
        ...

    async def heartbeat(self, tasks: Sequence[TaskRef]) -> list[TaskOutcome]:
        """Extend the lease of IN_PROGRESS rows; a refusal means the attempt is over."""
        ...

    async def release(
        self, tasks: Sequence[TaskRef], reason: str, *, delay_seconds: float = 0.0
    ) -> list[TaskOutcome]:
        """Hand rows back that never ran to a verdict (PENDING after ``delay_seconds``, attempt
        refunded): on clean shutdown, and for rows the conductor could not send."""
        ...

    async def mark_dispatched(self, dispatches: Sequence[tuple[TaskRef, str]]) -> int:
        """Record each row's dispatch id (e.g. the Modal call id) in its meta."""
        ...

    async def sweep_expired_leases(self, limit: int = 10_000) -> list[SweptRow]:
        """Retry or fail rows whose lease passed; roll up batches with nothing left to run."""
        ...

    async def lease_owners(self, prefix: str, batch_ids: Sequence[UUID] | None = None) -> list[str]:
        """The owners (starting with ``prefix``) holding leases of QUEUED or IN_PROGRESS rows."""
        ...

    async def reclaim_orphaned(
        self, owners: Sequence[str], *, batch_ids: Sequence[UUID] | None = None
    ) -> list[SweptRow]:
        """Take back, now, the rows leased by ``owners``, which the caller found gone: QUEUED rows
        never started (PENDING, attempt refunded); IN_PROGRESS rows are retried or FAILED as after
        a lost worker."""
        ...

    async def retry_failed(self, batch_id: UUID, step_name: str | None = None) -> int:
        """FAILED rows of a batch (optionally one step) back to PENDING. Raises NotFound."""
        ...

    async def cancel_batch(self, batch_id: UUID) -> int:
        """Unfinished rows of a batch -> FAILED ('cancelled'). Raises NotFound."""
        ...

    async def batch_progress(self, batch_id: UUID) -> BatchProgress:
        """Counts per step and status. Raises NotFound."""
        ...
