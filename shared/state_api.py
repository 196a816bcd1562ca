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
class TaskCost:
    """What one attempt's calls to one provider cost, for the ledger (``provider_costs``): the
    worker sums a task's ``Cost`` charges per provider. ``cached``: served from the result cache
    (``usd`` 0)."""

    task: TaskRef
    provider: str
    units: float
    usd: float
    cached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            **self.task.to_json(),
            "provider": self.provider,
            "units": self.units,
            "usd": self.usd,
            "cached": self.cached,
        }


@dataclass(frozen=True, slots=True)
class StepFailure:
    task: TaskRef
    error: str
    retryable: bool = True


@dataclass(frozen=True, slots=True)
class StepDeferral:
    """A provider answered 429: the row goes back to PENDING after ``retry_after`` seconds (None:
    the step's backoff) without using up an attempt, and ``provider``'s shared bucket slows down.
    Past the step's ``max_rate_limited`` it counts as a retryable failure."""

    task: TaskRef
    provider: str
    retry_after: float | None
    error: str


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
class CostSummary:
    """What a batch spent on paid providers, its budget and a projection for the rest.

    Paid rows are rows of steps whose config names a provider; ``projected_rest_usd`` is
    ``spent / paid_rows_done x paid_rows_left`` (before any is done: the expected cost per call x
    the rows left). ``paused_reason`` says why no paid row is claimed (the budget is reached)."""

    spent_usd: float = 0.0
    budget_usd: float | None = None
    paused_reason: str | None = None
    use_cache: bool = True
    paid_steps: tuple[str, ...] = ()
    paid_rows_done: int = 0
    paid_rows_left: int = 0
    projected_rest_usd: float = 0.0

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> CostSummary:
        if not data:
            return cls()
        budget = data.get("budget_usd")
        return cls(
            spent_usd=float(data.get("spent_usd") or 0),
            budget_usd=None if budget is None else float(budget),
            paused_reason=data.get("paused_reason"),
            use_cache=bool(data.get("use_cache", True)),
            paid_steps=tuple(str(s) for s in data.get("paid_steps") or ()),
            paid_rows_done=int(data.get("paid_rows_done") or 0),
            paid_rows_left=int(data.get("paid_rows_left") or 0),
            projected_rest_usd=float(data.get("projected_rest_usd") or 0),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "spent_usd": self.spent_usd,
            "budget_usd": self.budget_usd,
            "projected_rest_usd": self.projected_rest_usd,
            "paid_rows_done": self.paid_rows_done,
            "paid_rows_left": self.paid_rows_left,
            "paused_reason": self.paused_reason,
        }


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A batch's budget after ``set_budget``: ``paused_reason`` is None once it covers more."""

    batch_id: UUID
    budget_usd: float | None
    spent_usd: float
    paused_reason: str | None


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
    cost: CostSummary = field(default_factory=CostSummary)
    # step -> COMPLETED rows a condition skipped (config.skip_unless), and rows served from the
    # result cache (config.cache); both are counted COMPLETED in ``steps`` too.
    skipped: dict[str, int] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)

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

    @property
    def paused(self) -> bool:
        """Held by its budget with nothing else to do: every unfinished row is a PENDING row of
        a paid step, and no paid row of the batch is claimed until the budget is raised."""
        if self.cost.paused_reason is None or self.finished:
            return False
        paid = set(self.cost.paid_steps)
        return not any(
            counts["QUEUED"] or counts["IN_PROGRESS"] or (counts["PENDING"] and step not in paid)
            for step, counts in self.steps.items()
        )

    def to_json(self) -> dict[str, Any]:
        """The documented shape of ``enrich status --json``, plus ``awaiting_callback``: per
        step, the IN_PROGRESS rows that wait for their provider's callback, ``skipped`` and
        ``cached``: per step, the COMPLETED rows a condition skipped or the cache served, and
        ``cost``: what paid providers cost so far, the budget and a projection
        (``CostSummary.to_json``)."""
        return {
            "batch_id": str(self.batch_id),
            "status": self.status,
            "items": self.items,
            "steps": {step: dict(counts) for step, counts in self.steps.items()},
            "awaiting_callback": {step: self.awaiting.get(step, 0) for step in self.steps},
            "skipped": {step: self.skipped.get(step, 0) for step in self.steps},
            "cached": {step: self.cached.get(step, 0) for step in self.steps},
            "cost": self.cost.to_json(),
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
        budget_usd: float | None = None,
        use_cache: bool = True,
    ) -> UUID:
        """Create a batch; every item's first step starts PENDING. ``budget_usd`` caps what its
        paid steps may spend (None: no cap); ``use_cache`` False makes them call their provider
        even when the result cache has an answer. Raises InvalidInput."""
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

    async def defer(self, deferrals: Sequence[StepDeferral]) -> list[FailOutcome]:
        """Rate limited (HTTP 429): IN_PROGRESS -> PENDING after the Retry-After, the attempt
        refunded, and the provider's shared bucket slowed; past the step's ``max_rate_limited``,
        as ``fail``. ``status`` is the row's status afterwards."""
        ...

    async def record_costs(self, costs: Sequence[TaskCost]) -> int:
        """Write what provider calls cost to the ledger and the batches' ``spent_usd``, before the
        verdicts they led to. Idempotent: returns how many were new (a repeat records none)."""
        ...

    async def set_budget(self, batch_id: UUID, budget_usd: float | None) -> BudgetState:
        """Set a batch's budget (None: no cap). A budget above what was spent clears its pause and
        wakes the conductor. Raises NotFound, InvalidInput."""
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
