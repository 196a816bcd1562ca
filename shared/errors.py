"""The project's errors, in one place.

Workers and the conductor only need one distinction: can a retry help (``RetryableError``) or not
(``TerminalError``). Everything the project raises derives from ``EnrichError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class EnrichError(Exception):
    """Base class of every error the orchestrator raises on purpose."""


class RetryableError(EnrichError):
    """A transient failure: the same call may succeed later (network, rate limit, 5xx)."""


class TerminalError(EnrichError):
    """A failure that retrying will not fix (bad input, a rejected request)."""


class InvalidInput(TerminalError):
    """The caller's input is wrong: a bad blueprint, a malformed CSV, a bad argument."""


class QuotaExceeded(InvalidInput):
    """A quota in ``enrichment_settings`` refused the write (SQLSTATE 23514, constraint
    ``quota_*``): too many items, an item or a batch's name or meta too large, or too many
    unfinished rows for the client. Nothing was written; the message names the limit, the value
    and the setting."""


class NotFound(TerminalError):
    """An unknown batch, item or step."""


class ConfigurationError(TerminalError):
    """Settings or the environment are missing or inconsistent."""


class StaleAttempt(TerminalError):
    """The database refused a call for an attempt that is no longer current (fencing)."""


class RateLimited(RetryableError):
    """A provider refused the call for its rate limit (HTTP 429). The row goes back to PENDING
    after ``retry_after`` seconds (the provider's Retry-After; None: the step's backoff) without
    using up an attempt, and the provider's shared bucket slows down for every worker."""

    def __init__(self, message: str, *, provider: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.retry_after = retry_after


class DispatchError(RetryableError):
    """Some claimed rows could not be sent to workers: ``unsent`` lists them, the rest were sent."""

    def __init__(self, message: str, unsent: Sequence[Any]) -> None:
        super().__init__(message)
        self.unsent = list(unsent)


class DatabaseUnavailable(RetryableError):
    """The database could not be reached."""


class EmbeddedPostgresError(EnrichError):
    """The private PostgreSQL cluster could not be initialised, started or stopped."""
