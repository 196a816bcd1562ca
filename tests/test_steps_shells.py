"""The shell steps step_a / step_b / noop: sleep, heartbeat, deterministic failure injection."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from typing import Any
from uuid import UUID

import pytest

from shared.errors import ConfigurationError, RetryableError, StaleAttempt, TerminalError
from shared.steps import HANDLERS, StepContext, StepHandler
from shared.steps.shells import injected_failure, noop, step_a, step_b


class Beats:
    """A heartbeat that records when it was called, and can report a lost lease."""

    def __init__(self, lose_after: int | None = None) -> None:
        self.times: list[float] = []
        self.lose_after = lose_after

    async def __call__(self) -> None:
        self.times.append(time.monotonic())
        if self.lose_after is not None and len(self.times) > self.lose_after:
            raise StaleAttempt("attempt lost")


def _ctx(
    config: Mapping[str, Any] | None = None,
    *,
    attempt: int = 1,
    item: int = 0,
    step_name: str = "step_a",
    beats: Beats | None = None,
) -> StepContext:
    return StepContext(
        batch_id=UUID(int=1),
        item_id=UUID(int=item),
        step_name=step_name,
        attempt=attempt,
        config=config or {},
        heartbeat=beats or Beats(),
    )


def test_handlers_are_keyed_by_modal_function_name() -> None:
    assert set(HANDLERS) == {
        "step_a",
        "step_b",
        "normalize_domain",
        "clean_company_name",
        "noop",
        "step_async",
        "clay_enrich",
        "exa_verify",
    }
    assert HANDLERS["step_a"] is step_a
    assert HANDLERS["step_b"] is step_b
    assert HANDLERS["noop"] is noop


# (config, item_id as int, attempt, expected outcome: "ok", "retry" or "terminal")
INJECTION: list[tuple[dict[str, Any], int, int, str]] = [
    ({}, 0, 1, "ok"),
    ({}, 7, 5, "ok"),
    # "Fail the first attempt, then succeed."
    ({"fail_attempts": 1}, 0, 1, "retry"),
    ({"fail_attempts": 1}, 0, 2, "ok"),
    ({"fail_attempts": 1}, 12345, 1, "retry"),
    ({"fail_attempts": 2}, 5, 2, "retry"),
    ({"fail_attempts": 2}, 5, 3, "ok"),
    ({"fail_attempts": 0}, 0, 1, "ok"),
    # "Always fail."
    ({"fail_every": 1}, 0, 1, "retry"),
    ({"fail_every": 1}, 99, 2, "retry"),
    ({"fail_every": 1}, 99, 50, "retry"),
    # Every n-th item (by item_id), on every attempt.
    ({"fail_every": 3}, 0, 1, "retry"),
    ({"fail_every": 3}, 3, 4, "retry"),
    ({"fail_every": 3}, 4, 1, "ok"),
    ({"fail_every": 3}, 5, 9, "ok"),
    # Every n-th item, first attempt only.
    ({"fail_every": 3, "fail_attempts": 1}, 6, 1, "retry"),
    ({"fail_every": 3, "fail_attempts": 1}, 6, 2, "ok"),
    ({"fail_every": 3, "fail_attempts": 1}, 7, 1, "ok"),
    # Terminal instead of retryable.
    ({"fail_every": 1, "fail_terminal": True}, 0, 1, "terminal"),
    ({"fail_attempts": 1, "fail_terminal": True}, 0, 2, "ok"),
    ({"fail_terminal": True}, 0, 1, "ok"),
]


@pytest.mark.asyncio
@pytest.mark.parametrize("handler", [step_a, step_b])
@pytest.mark.parametrize(("config", "item", "attempt", "outcome"), INJECTION)
async def test_failure_injection(
    handler: StepHandler, config: dict[str, Any], item: int, attempt: int, outcome: str
) -> None:
    ctx = _ctx(config, attempt=attempt, item=item)
    if outcome == "ok":
        assert await handler({}, ctx) == {"slept_ms": 0, "attempt": attempt}
        return
    expected = TerminalError if outcome == "terminal" else RetryableError
    with pytest.raises(expected) as info:
        await handler({}, ctx)
    assert str(info.value).startswith("injected failure (")
    if outcome == "retry":
        assert not isinstance(info.value, TerminalError)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"fail_attempts": 1}, "injected failure (fail_attempts=1) at attempt 1 of step_b"),
        ({"fail_every": 1}, "injected failure (fail_every=1) at attempt 1 of step_b"),
        (
            {"fail_every": 2, "fail_attempts": 3},
            "injected failure (fail_every=2, fail_attempts=3) at attempt 1 of step_b",
        ),
    ],
)
def test_injected_failure_message(config: dict[str, Any], message: str) -> None:
    assert injected_failure(_ctx(config, step_name="step_b")) == message


def test_fail_every_selects_about_one_in_n_items_deterministically() -> None:
    rng = random.Random(20261122)
    items = [UUID(int=rng.getrandbits(128), version=4) for _ in range(2000)]

    def failing() -> list[UUID]:
        return [
            item
            for item in items
            if injected_failure(
                StepContext(UUID(int=1), item, "step_a", 1, {"fail_every": 10}, Beats())
            )
        ]

    first = failing()
    assert 140 <= len(first) <= 260
    assert failing() == first


@pytest.mark.asyncio
async def test_sleeps_and_reports() -> None:
    beats = Beats()
    started = time.monotonic()
    result = await step_a({"anything": 1}, _ctx({"sleep_ms": 30}, attempt=2, beats=beats))
    assert time.monotonic() - started >= 0.029
    assert result == {"slept_ms": 30, "attempt": 2}
    assert beats.times == []  # shorter than heartbeat_seconds: no heartbeat needed


@pytest.mark.asyncio
async def test_fractional_sleep_is_reported_as_given() -> None:
    assert await step_a({}, _ctx({"sleep_ms": 1.5})) == {"slept_ms": 1.5, "attempt": 1}


@pytest.mark.asyncio
async def test_long_sleep_heartbeats_at_least_every_heartbeat_seconds() -> None:
    beats = Beats()
    started = time.monotonic()
    await step_b({}, _ctx({"sleep_ms": 200, "heartbeat_seconds": 0.04}, beats=beats))
    ended = time.monotonic()
    assert ended - started >= 0.199
    assert len(beats.times) >= 4
    gaps = [b - a for a, b in zip([started, *beats.times], [*beats.times, ended], strict=True)]
    assert max(gaps) < 0.04 + 0.05  # generous slack for a loaded CI machine


@pytest.mark.asyncio
async def test_lost_lease_stops_the_sleep() -> None:
    beats = Beats(lose_after=1)
    started = time.monotonic()
    with pytest.raises(StaleAttempt):
        await step_a({}, _ctx({"sleep_ms": 5000, "heartbeat_seconds": 0.01}, beats=beats))
    assert time.monotonic() - started < 1
    assert len(beats.times) == 2


@pytest.mark.asyncio
async def test_injected_failure_comes_after_the_sleep() -> None:
    started = time.monotonic()
    with pytest.raises(RetryableError):
        await step_a({}, _ctx({"sleep_ms": 20, "fail_every": 1}))
    assert time.monotonic() - started >= 0.019


@pytest.mark.asyncio
async def test_cancellation_interrupts_the_sleep() -> None:
    task = asyncio.create_task(step_a({}, _ctx({"sleep_ms": 10_000})))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "config",
    [
        {"sleep_ms": -1},
        {"sleep_ms": "50"},
        {"sleep_ms": True},
        {"sleep_ms": None},
        {"heartbeat_seconds": 0},
        {"fail_every": 0},
        {"fail_every": 2.5},
        {"fail_every": "3"},
        {"fail_attempts": -1},
        {"fail_attempts": True},
        {"fail_terminal": "yes"},
    ],
)
async def test_bad_config_is_a_configuration_error(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        await step_a({}, _ctx(config))


@pytest.mark.asyncio
async def test_noop_returns_an_empty_object_at_once() -> None:
    beats = Beats()
    # noop ignores config entirely, even the shells' keys.
    assert await noop({"x": 1}, _ctx({"sleep_ms": 10_000, "fail_every": 1}, beats=beats)) == {}
    assert beats.times == []
