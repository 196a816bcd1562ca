"""What every step handler receives, and small helpers for reading its input and config.

A handler is ``async def handler(raw, ctx) -> dict``: ``raw`` is the item's input (a JSON object,
usually one CSV row with lower_snake_case keys) and the returned dict is the result JSON object the
worker writes to the step's results table. Handlers signal failure with ``RetryableError`` or
``TerminalError`` from ``shared.errors``; the worker treats any other exception as retryable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from shared.errors import ConfigurationError
from shared.state_api import Cost

# Kept where the step modules have always found them; they live beside the steps' declared inputs.
from shared.step_inputs import config_fields, normalize_key

__all__ = [
    "StepContext",
    "StepHandler",
    "Submitted",
    "config_fields",
    "config_flag",
    "field_value",
    "normalize_key",
    "present_keys",
]


@dataclass(frozen=True, slots=True)
class StepContext:
    """Identity of the attempt being run, the step's registry config, and its lease heartbeat.

    ``heartbeat`` extends the lease of this attempt; it raises ``TerminalError`` (``StaleAttempt``)
    when the attempt is no longer current, which a handler should let propagate.
    """

    batch_id: UUID
    item_id: UUID
    step_name: str
    attempt: int
    config: Mapping[str, Any]
    heartbeat: Callable[[], Awaitable[None]]
    # Where the provider of an ASYNC step posts its answer: a URL carrying a token signed for this
    # attempt. None where no callback receiver runs.
    callback_url: str | None = None
    # Results of the earlier steps the step's config ``needs``: {"normalize_domain": {...}}. A
    # step that has no result for this item (yet) is absent.
    inputs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Records what a provider call cost, as soon as the provider billed it (before the result is
    # trusted: a call that then fails still cost money). The worker writes it to the ledger.
    charge: Callable[[Cost], None] = field(default=lambda cost: None)


@dataclass(frozen=True, slots=True)
class Submitted:
    """What an ASYNC step's handler returns once the provider accepted the item: the row then
    awaits its callback, and no worker waits for it. ``request_id`` is the provider's name for the
    request (kept in the row's meta, for tracing)."""

    request_id: str


StepHandler = Callable[[Mapping[str, Any], StepContext], Awaitable[dict[str, Any] | Submitted]]


def field_value(raw: Mapping[str, Any], name: str) -> tuple[str, Any] | None:
    """The value of field ``name`` and the key it was found under, or None when absent.

    Rows inserted by hand (Supabase Studio, SQL) may keep the original header spelling
    (``"Website"``), so an exact key wins and a key that normalizes to ``name`` is accepted too.
    """
    if name in raw:
        return name, raw[name]
    wanted = normalize_key(name)
    for key, value in raw.items():
        if isinstance(key, str) and normalize_key(key) == wanted:
            return key, value
    return None


def config_flag(config: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ConfigurationError(f"config.{key} must be true or false, got {value!r}")
    return value


def present_keys(raw: Mapping[str, Any], limit: int = 12) -> str:
    """The row's keys for an error message: enough to spot a misnamed column, never the values."""
    keys = [str(key) for key in raw]
    if not keys:
        return "the row is empty"
    shown = ", ".join(keys[:limit])
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return f"row has: {shown}{more}"
