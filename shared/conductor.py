"""The conductor's pass: sweep expired leases, claim ready rows, hand them to a dispatcher, exit.

Stateless and data-agnostic: it sees ids, step names, attempts and function names, never raw_data
or results. Any number of passes may overlap (claims use FOR UPDATE SKIP LOCKED), so the Prefect
flow, ``enrich run`` and ``enrich serve`` all call this same function.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol
from uuid import UUID

from shared.errors import DispatchError
from shared.state_api import ClaimedTask, StateAPI

log = logging.getLogger(__name__)

# How long rows that could not be sent to workers wait before the next try.
DISPATCH_RETRY_SECONDS = 15.0


class Dispatcher(Protocol):
    """Sends claimed rows to workers without waiting for the work to finish."""

    def capacity(self) -> int | None:
        """How many more rows it can take now; None when it does not limit (Modal scales out)."""
        ...

    async def dispatch(self, function_name: str, claimed: Sequence[ClaimedTask]) -> None:
        """Send rows of one step function. Raises DispatchError naming the rows it could not
        send; any other exception means none was sent."""
        ...


@dataclass
class PassReport:
    swept: int = 0
    claimed: int = 0
    dispatched: int = 0
    dispatch_failures: int = 0
    by_function: dict[str, int] = field(default_factory=dict)


def group_by_function(claimed: Sequence[ClaimedTask]) -> dict[str, list[ClaimedTask]]:
    groups: dict[str, list[ClaimedTask]] = defaultdict(list)
    for row in claimed:
        groups[row.function_name].append(row)
    return dict(groups)


async def conduct(
    api: StateAPI,
    dispatcher: Dispatcher,
    *,
    claim_limit: int = 1000,
    max_rows: int | None = None,
    batch_ids: Sequence[UUID] | None = None,
    sweep: bool = True,
    dispatch_retry_seconds: float = DISPATCH_RETRY_SECONDS,
    owner: str | None = None,
) -> PassReport:
    """One conductor pass. Claims until nothing is ready, the dispatcher is full or ``max_rows``.
    ``owner`` names the process that will run the rows, when it is this one (the local pool)."""
    report = PassReport()
    if sweep:
        report.swept = len(await api.sweep_expired_leases())
    while True:
        room = dispatcher.capacity()
        limit = claim_limit if room is None else min(claim_limit, room)
        if max_rows is not None:
            limit = min(limit, max_rows - report.claimed)
        if limit <= 0:
            break
        claimed = await api.claim(limit, batch_ids=batch_ids, owner=owner)
        if not claimed:
            break
        report.claimed += len(claimed)
        for function_name, rows in group_by_function(claimed).items():
            unsent: list[ClaimedTask] = []
            error: Exception | None = None
            try:
                await dispatcher.dispatch(function_name, rows)
            except DispatchError as exc:
                unsent, error = exc.unsent, exc
            except Exception as exc:
                unsent, error = rows, exc
            if unsent:
                # Never sent, so never run: hand the rows back with their attempt refunded (an
                # outage of the workers' platform must not use up retries), after a delay so that
                # this pass and the next ones do not spin on them while the outage lasts.
                log.error("dispatch of %d rows to %s failed: %s", len(unsent), function_name, error)
                report.dispatch_failures += len(unsent)
                await api.release(
                    [r.task for r in unsent],
                    f"dispatch to {function_name} failed: {error}",
                    delay_seconds=dispatch_retry_seconds,
                )
            sent = len(rows) - len(unsent)
            report.dispatched += sent
            report.by_function[function_name] = report.by_function.get(function_name, 0) + sent
        if len(claimed) < limit:
            break
    return report


async def conduct_until_idle(
    api: StateAPI,
    dispatcher: Dispatcher,
    *,
    linger_seconds: float,
    poll_seconds: float = 0.2,
    claim_limit: int = 1000,
    max_rows: int | None = None,
    batch_ids: Sequence[UUID] | None = None,
) -> PassReport:
    """Passes until ``linger_seconds`` go by with nothing to claim (or ``max_rows`` are claimed).

    A flow run costs seconds to start (an event, an automation, a process), while the next step of
    a wave becomes ready a moment after its workers finish. Lingering briefly lets one run hand
    that wave on within a poll instead of paying for a new run per step. The run stays stateless:
    everything it does is a claim, and an overlapping run only finds fewer rows.
    """
    total = PassReport()
    idle_since = time.monotonic()
    first = True
    while True:
        left = None if max_rows is None else max_rows - total.claimed
        if left is not None and left <= 0:
            break
        report = await conduct(
            api,
            dispatcher,
            claim_limit=claim_limit,
            max_rows=left,
            batch_ids=batch_ids,
            sweep=first,
        )
        first = False
        total.swept += report.swept
        total.claimed += report.claimed
        total.dispatched += report.dispatched
        total.dispatch_failures += report.dispatch_failures
        for name, count in report.by_function.items():
            total.by_function[name] = total.by_function.get(name, 0) + count
        now = time.monotonic()
        if report.claimed:
            idle_since = now
        elif now - idle_since >= linger_seconds:
            break
        else:
            await asyncio.sleep(poll_seconds)
    return total
