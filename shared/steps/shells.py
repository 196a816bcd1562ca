"""The tracer-bullet steps ``step_a`` / ``step_b`` and ``noop``: they call no API.

They stand in for a real enrichment call so the whole pipeline (claim, lease, heartbeat, retry,
fail, roll-up) can be exercised and benchmarked. Their config (registry ``config`` JSON):

``sleep_ms`` (default 0)
    How long the pretend API call takes.
``heartbeat_seconds`` (default 10)
    During a sleep longer than this, the lease is heartbeated at least this often.
``fail_every`` (int >= 1) and ``fail_attempts`` (int >= 0)
    Deterministic failure injection, decided after the sleep (a real call fails after its latency).
    ``fail_every: n`` selects the items whose ``item_id.int % n == 0``: about 1/n of random UUIDs,
    always the same items, on every attempt and in every run (1 selects every item).
    ``fail_attempts: k`` makes attempts 1..k of a selected item fail, later attempts succeed.
    Setting only one of them means: ``fail_every`` alone -> every attempt of a selected item fails;
    ``fail_attempts`` alone -> every item is selected. Neither -> no failures. Examples:
    ``{"fail_attempts": 1}`` fails each item's first attempt then succeeds; ``{"fail_every": 1}``
    always fails; ``{"fail_every": 10, "fail_attempts": 1}`` fails the first attempt of ~10% of
    items.
``fail_terminal`` (default false)
    Injected failures raise ``TerminalError`` (no retry) instead of ``RetryableError``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from shared.errors import ConfigurationError, RetryableError, TerminalError
from shared.steps.base import StepContext, config_flag

DEFAULT_HEARTBEAT_SECONDS = 10.0


def _number(config: Mapping[str, Any], key: str, default: float, *, minimum: float) -> float:
    value = config.get(key, default)
    # bool is an int subclass; `"sleep_ms": true` is a config mistake, not 1 ms.
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise ConfigurationError(f"config.{key} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _optional_int(config: Mapping[str, Any], key: str, *, minimum: int) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"config.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def injected_failure(ctx: StepContext) -> str | None:
    """Why this attempt must fail under the config's failure injection, or None."""
    every = _optional_int(ctx.config, "fail_every", minimum=1)
    attempts = _optional_int(ctx.config, "fail_attempts", minimum=0)
    if every is None and attempts is None:
        return None
    if every is not None and ctx.item_id.int % every != 0:
        return None
    if attempts is not None and ctx.attempt > attempts:
        return None
    rule = ", ".join(
        f"{key}={value}"
        for key, value in (("fail_every", every), ("fail_attempts", attempts))
        if value is not None
    )
    return f"injected failure ({rule}) at attempt {ctx.attempt} of {ctx.step_name}"


async def sleep_with_heartbeat(ctx: StepContext, seconds: float, every: float) -> None:
    """Sleep ``seconds``, calling ``ctx.heartbeat()`` at least every ``every`` seconds meanwhile.

    A lost lease surfaces here as the heartbeat's ``TerminalError``, so a stale attempt stops early
    instead of finishing work nobody will accept.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while True:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        if remaining <= every:
            await asyncio.sleep(remaining)
            return
        await asyncio.sleep(every)
        await ctx.heartbeat()


async def _shell(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
    sleep_ms = _number(ctx.config, "sleep_ms", 0, minimum=0)
    every = _number(ctx.config, "heartbeat_seconds", DEFAULT_HEARTBEAT_SECONDS, minimum=0.001)
    terminal = config_flag(ctx.config, "fail_terminal")
    failure = injected_failure(ctx)  # validates the config before sleeping
    if sleep_ms > 0:
        await sleep_with_heartbeat(ctx, sleep_ms / 1000, every)
    if failure is not None:
        raise TerminalError(failure) if terminal else RetryableError(failure)
    slept: int | float = int(sleep_ms) if sleep_ms.is_integer() else sleep_ms
    return {"slept_ms": slept, "attempt": ctx.attempt}


async def step_a(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Shell step A: sleep ``config.sleep_ms`` then succeed, unless failure injection says so."""
    return await _shell(raw, ctx)


async def step_b(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Shell step B: same behaviour as step A, registered separately to chain two steps."""
    return await _shell(raw, ctx)


async def noop(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
    """Does nothing: measures the orchestrator's own overhead in benchmarks."""
    return {}
