"""What every step handler receives, and small helpers for reading its input and config.

A handler is ``async def handler(raw, ctx) -> dict``: ``raw`` is the item's input (a JSON object,
usually one CSV row with lower_snake_case keys) and the returned dict is the result JSON object the
worker writes to the step's results table. Handlers signal failure with ``RetryableError`` or
``TerminalError`` from ``shared.errors``; the worker treats any other exception as retryable.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from shared.errors import ConfigurationError
from shared.state_api import Cost


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


@dataclass(frozen=True, slots=True)
class StepInputs:
    """What a step reads from an item, declared so that an import can refuse a file none of whose
    columns feeds the step (every item would fail) before anything is written.

    The step is fed when the item has any of ``fields`` (raw_data keys, compared as
    ``field_value`` compares them) or when any of ``steps`` (earlier steps whose results it reads
    through ``config.needs``) runs before it in the blueprint. ``what`` says it in the user's
    words: "a website, domain or email column".
    """

    what: str
    fields: tuple[str, ...]
    steps: tuple[str, ...] = ()


# A step's registry config -> what it reads. Steps without a declaration read nothing.
InputsOf = Callable[[Mapping[str, Any]], StepInputs]

_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def normalize_key(key: str) -> str:
    """``"Company Website"`` -> ``"company_website"``: the form CSV headers are imported in."""
    return _NON_ALNUM.sub("_", key.strip().lower()).strip("_")


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


def config_fields(config: Mapping[str, Any], key: str, default: Sequence[str]) -> tuple[str, ...]:
    """An ordered list of input field names from the step config, e.g. ``source_fields``."""
    value = config.get(key)
    if value is None:
        return tuple(default)
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, Sequence)
        or not value
        or not all(isinstance(item, str) and item.strip() for item in value)
    ):
        raise ConfigurationError(
            f"config.{key} must be a non-empty list of field names, got {value!r}"
        )
    return tuple(item.strip() for item in value)


def needed_steps(config: Mapping[str, Any], readable: Sequence[str]) -> tuple[str, ...]:
    """Those of ``readable`` (the earlier steps a handler knows how to read) that the step's
    ``config.needs`` names: only their results reach the handler as ``ctx.inputs``."""
    needs = config.get("needs")
    names = needs if isinstance(needs, list) else []
    return tuple(step for step in readable if step in names)


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
