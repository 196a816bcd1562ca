"""Riding out a database outage: a restart, a failover, Supabase's maintenance.

A database that goes away for a few seconds is normal operation, not an error: every State API
call is guarded by status and attempt, so a call repeated after the database comes back does the
right thing (it is applied once, or refused because it already was). ``Outage`` tracks one stretch
of unavailability (when it began, the next delay, when to give up); ``call_through_outage`` repeats
one call until it goes through.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from shared.errors import DatabaseUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)

FIRST_DELAY = 0.25
MAX_DELAY = 5.0


class DatabaseGone(DatabaseUnavailable):
    """The database stayed unreachable for longer than the configured limit."""


class Outage:
    """One stretch of unavailability: the next delay (exponential with jitter, capped), and
    ``DatabaseGone`` once it has lasted ``limit_seconds`` (None: never give up)."""

    def __init__(self, limit_seconds: float | None, *, what: str = "the database") -> None:
        self.limit_seconds = limit_seconds
        self.what = what
        self.since: float | None = None
        self._delay = FIRST_DELAY

    @property
    def ongoing(self) -> bool:
        return self.since is not None

    def seconds(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since

    def failed(self, exc: Exception) -> float:
        """Record a failed call; returns how long to wait before the next one."""
        now = time.monotonic()
        if self.since is None:
            self.since = now
            self._delay = FIRST_DELAY
        elif self.limit_seconds is not None and now - self.since >= self.limit_seconds:
            raise DatabaseGone(
                f"{self.what} has been unreachable for {now - self.since:.0f}s "
                f"(limit {self.limit_seconds:.0f}s): {exc}"
            ) from exc
        delay = self._delay * random.uniform(0.8, 1.2)
        self._delay = min(self._delay * 2, MAX_DELAY)
        if self.limit_seconds is not None:
            delay = min(delay, max(self.limit_seconds - (now - self.since), 0.0) + 0.01)
        return delay

    def recovered(self) -> float | None:
        """Record a call that went through; returns how long the outage lasted, if there was one."""
        if self.since is None:
            return None
        lasted = time.monotonic() - self.since
        self.since = None
        return lasted


async def call_through_outage(
    call: Callable[[], Awaitable[T]], *, limit_seconds: float | None, what: str
) -> T:
    """``await call()``, repeated while the database is unreachable, for up to ``limit_seconds``.

    Only safe for calls that are idempotent or guarded (every State API transition is).
    """
    outage = Outage(limit_seconds, what=what)
    while True:
        try:
            result = await call()
        except DatabaseUnavailable as exc:
            delay = outage.failed(exc)
            log.debug("%s: database unavailable (%s); again in %.2fs", what, exc, delay)
            await asyncio.sleep(delay)
            continue
        lasted = outage.recovered()
        if lasted is not None:
            log.debug("%s went through after %.1fs", what, lasted)
        return result
