"""Paid providers (issue 8): the bucket, caps and budgets at claim time, the 429 path (defer),
the cost ledger (record_costs) and budgets (set_budget), on every StateAPI implementation."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg.types.json import Jsonb

from shared.errors import InvalidInput, NotFound
from shared.state_api import (
    Outcome,
    StateAPI,
    StepDeferral,
    StepResult,
    TaskCost,
    TaskRef,
)

from . import (
    Conn,
    batch_row,
    company,
    db_now,
    fetch_one,
    make_ready,
    state,
    tasks,
    with_attempt,
)

PAID = "paid_lookup"


async def add_provider(conn: Conn, name: str = "testapi", **limits: Any) -> None:
    """A provider with a generous bucket unless ``limits`` say otherwise."""
    values = {"requests_per_second": 1000, "burst": 1000, **limits}
    columns = ", ".join(values)
    placeholders = ", ".join(["%s"] * len(values))
    await conn.execute(
        f"insert into providers (name, {columns}) values (%s, {placeholders})".encode(),
        (name, *values.values()),
    )


async def add_paid_step(conn: Conn, name: str = PAID, **config: Any) -> None:
    await conn.execute(
        "insert into enrichment_registry (step_name, modal_function_name, config)"
        " values (%s, %s, %s)",
        (name, name, Jsonb({"provider": "testapi", "backoff_seconds": 0, **config})),
    )


async def provider(conn: Conn, name: str = "testapi") -> dict[str, Any]:
    return await fetch_one(
        conn,
        "select p.*, provider_tokens(p, clock_timestamp()) as now_tokens,"
        " provider_slowdown(p, clock_timestamp()) as now_slowdown from providers p"
        " where name = %s",
        (name,),
    )


async def claim_start(api: StateAPI, batch_id: UUID, limit: int = 100) -> list[TaskRef]:
    claimed = tasks(await api.claim(limit, batch_ids=[batch_id]))
    started = await api.start(claimed)
    assert all(s.ok for s in started), started
    return claimed


def cost(task: TaskRef, usd: float, *, provider: str = "testapi", cached: bool = False) -> TaskCost:
    return TaskCost(task, provider, 1, usd, cached)


# Claims: the bucket, max_concurrency, daily_cap -------------------------------------------------


async def test_a_claim_takes_no_more_rows_than_the_bucket_holds(
    state_api: StateAPI, conn: Conn
) -> None:
    await add_provider(conn, requests_per_second=0.001, burst=3)
    await add_paid_step(conn)
    paid = await state_api.create_batch([PAID], [company(i) for i in range(10)])
    free = await state_api.create_batch(["normalize_domain"], [company(i) for i in range(5)])

    claimed = await state_api.claim(100)

    by_batch = {b: sum(c.task.batch_id == b for c in claimed) for b in (paid, free)}
    # Three tokens for the paid step; rows of a step without a provider are claimed as ever.
    assert by_batch == {paid: 3, free: 5}
    assert await state_api.claim(100) == []
    bucket = await provider(conn)
    assert bucket["calls_today"] == 3
    assert bucket["now_tokens"] < 1


async def test_max_concurrency_counts_rows_in_flight(state_api: StateAPI, conn: Conn) -> None:
    await add_provider(conn, max_concurrency=2)
    await add_paid_step(conn)
    batch_id = await state_api.create_batch([PAID], [company(i) for i in range(5)])

    first = await claim_start(state_api, batch_id)
    assert len(first) == 2
    assert await state_api.claim(100) == []  # two in flight already
    await state_api.complete([StepResult(first[0], {})])
    assert len(await state_api.claim(100)) == 1


async def test_daily_cap_counts_calls_claimed_today(state_api: StateAPI, conn: Conn) -> None:
    await add_provider(conn, daily_cap=4)
    await add_paid_step(conn)
    batch_id = await state_api.create_batch([PAID], [company(i) for i in range(6)])

    assert len(await state_api.claim(3)) == 3
    assert len(await state_api.claim(100)) == 1
    assert await state_api.claim(100) == []
    # A new day (UTC) starts from zero.
    await conn.execute("update providers set calls_day = calls_day - 1 where name = 'testapi'")
    assert len(await state_api.claim(100, batch_ids=[batch_id])) == 2


async def test_a_step_must_name_a_known_provider(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r'"nope" names no row'):
        await conn.execute(
            "insert into enrichment_registry (step_name, modal_function_name, config)"
            """ values ('bad_paid', 'x', '{"provider": "nope"}')"""
        )
    await add_provider(conn)
    await add_paid_step(conn)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="is named by step"):
        await conn.execute("delete from providers where name = 'testapi'")


# The 429 path ------------------------------------------------------------------------------------


async def test_a_rate_limited_row_waits_for_retry_after_without_using_an_attempt(
    state_api: StateAPI, conn: Conn
) -> None:
    await add_provider(conn)
    await add_paid_step(conn, max_attempts=1)
    batch_id = await state_api.create_batch([PAID], [company(0), company(1)])
    [one, two] = await claim_start(state_api, batch_id)

    [answer] = await state_api.defer([StepDeferral(one, "testapi", 30.0, "HTTP 429")])

    assert answer.ok and answer.status == "PENDING"
    row = await state(conn, one)
    assert row["status"] == "PENDING"
    assert row["attempt"] == 1 and row["retry_from"] == 1  # attempt 1 no longer counts
    assert row["meta"]["rate_limited"] == 1
    assert row["meta"]["last_error"]["kind"] == "rate_limited"
    wait = (row["run_after"] - await db_now(conn)).total_seconds()
    assert 28 < wait <= 30
    # The whole bucket slows down: no tokens before Retry-After has passed, then half the rate.
    bucket = await provider(conn)
    assert bucket["blocked_until"] - await db_now(conn) > timedelta(seconds=28)
    assert bucket["now_tokens"] == 0 and bucket["slowdown"] == 2 and bucket["rate_limited"] == 1
    # A 429 for a stale attempt changes no row (the bucket still slows: the 429 happened).
    [late] = await state_api.defer([StepDeferral(with_attempt(two, 7), "testapi", None, "429")])
    assert late.outcome is Outcome.STALE_ATTEMPT
    assert (await state(conn, two))["status"] == "IN_PROGRESS"

    # Once Retry-After passed (pushed into the past here) the row runs again: max_attempts is 1,
    # yet the 429 did not use it up.
    await make_ready(conn, batch_id)
    await conn.execute(
        "update providers set blocked_until = now() - interval '1 second' where name = 'testapi'"
    )
    [again] = await claim_start(state_api, batch_id)
    assert again.attempt == 2
    assert (await state_api.complete([StepResult(again, {"ok": True})]))[0].ok


async def test_past_max_rate_limited_a_429_is_a_failed_attempt(
    state_api: StateAPI, conn: Conn
) -> None:
    await add_provider(conn)
    await add_paid_step(conn, max_rate_limited=1, max_attempts=2)
    batch_id = await state_api.create_batch([PAID], [company(0)])
    statuses = []
    for _ in range(3):
        await conn.execute("update providers set blocked_until = null where name = 'testapi'")
        await make_ready(conn, batch_id)
        [task] = await claim_start(state_api, batch_id)
        [answer] = await state_api.defer([StepDeferral(task, "testapi", 0.0, "HTTP 429")])
        statuses.append(answer.status)

    # Deferred once for free, then two counted attempts (max_attempts 2): FAILED, not forever.
    assert statuses == ["PENDING", "PENDING", "FAILED"]
    row = await state(conn, task)
    assert row["attempt"] == 3 and row["retry_from"] == 1
    assert "past max_rate_limited = 1" in row["meta"]["error"]
    assert (await batch_row(conn, batch_id))["status"] == "FAILED"


async def test_defer_refuses_a_negative_retry_after(state_api: StateAPI, conn: Conn) -> None:
    await add_provider(conn)
    await add_paid_step(conn)
    batch_id = await state_api.create_batch([PAID], [company(0)])
    [task] = await claim_start(state_api, batch_id)
    with pytest.raises(InvalidInput, match="retry_after_seconds"):
        await state_api.defer([StepDeferral(task, "testapi", -1.0, "429")])


# The ledger --------------------------------------------------------------------------------------


async def test_record_costs_is_idempotent_and_keeps_spent_usd(
    state_api: StateAPI, conn: Conn
) -> None:
    await add_provider(conn)
    await add_paid_step(conn)
    batch_id = await state_api.create_batch([PAID], [company(0), company(1)])
    [one, two] = await claim_start(state_api, batch_id)
    costs = [cost(one, 0.25), cost(two, 0.5), cost(two, 0.0, provider="cache", cached=True)]

    assert await state_api.record_costs(costs) == 3
    assert await state_api.record_costs(costs) == 0  # a repeat after a lost answer
    assert await state_api.record_costs([]) == 0

    assert float((await batch_row(conn, batch_id))["spent_usd"]) == pytest.approx(0.75)
    ledger = await fetch_one(
        conn,
        "select count(*) as n, sum(usd) as usd, count(*) filter (where cached) as cached"
        " from provider_costs where batch_id = %s",
        (batch_id,),
    )
    assert (ledger["n"], float(ledger["usd"]), ledger["cached"]) == (3, 0.75, 1)
    # A stale attempt's call was paid for all the same.
    assert await state_api.record_costs([cost(with_attempt(one, 9), 0.1)]) == 1
    progress = await state_api.batch_progress(batch_id)
    assert progress.cost.spent_usd == pytest.approx(0.85)


async def test_record_costs_refuses_a_negative_cost(state_api: StateAPI, conn: Conn) -> None:
    await add_provider(conn)
    await add_paid_step(conn)
    batch_id = await state_api.create_batch([PAID], [company(0)])
    [task] = await claim_start(state_api, batch_id)
    with pytest.raises(InvalidInput, match="usd"):
        await state_api.record_costs([cost(task, -1.0)])


# Budgets -----------------------------------------------------------------------------------------


async def test_a_budget_stops_claims_and_raising_it_resumes(
    state_api: StateAPI, conn: Conn
) -> None:
    await add_provider(conn, cost_usd=0.5)
    await add_paid_step(conn)
    batch_id = await state_api.create_batch(
        [PAID], [company(i) for i in range(5)], budget_usd=1.0, use_cache=False
    )
    row = await batch_row(conn, batch_id)
    assert (float(row["budget_usd"]), row["use_cache"], row["spent_usd"]) == (1.0, False, 0)

    first = await claim_start(state_api, batch_id)
    assert len(first) == 2  # what $1.00 covers at $0.50 a call
    assert await state_api.claim(100) == []  # the two in flight are counted
    await state_api.record_costs([cost(t, 0.5) for t in first])
    await state_api.complete([StepResult(t, {}) for t in first])
    assert await state_api.claim(100) == []

    progress = await state_api.batch_progress(batch_id)
    assert progress.cost.paused_reason == "budget reached: $1.00 of $1.00"
    assert progress.paused and not progress.finished
    assert progress.cost.paid_rows_done == 2 and progress.cost.paid_rows_left == 3
    assert progress.cost.projected_rest_usd == pytest.approx(1.5)
    assert progress.to_json()["cost"] == {
        "spent_usd": 1.0,
        "budget_usd": 1.0,
        "projected_rest_usd": 1.5,
        "paid_rows_done": 2,
        "paid_rows_left": 3,
        "paused_reason": "budget reached: $1.00 of $1.00",
    }

    budget = await state_api.set_budget(batch_id, 2.0)
    assert (budget.budget_usd, budget.spent_usd, budget.paused_reason) == (2.0, 1.0, None)
    assert len(await state_api.claim(100)) == 2
    # No budget at all: the rest.
    await state_api.set_budget(batch_id, None)
    assert len(await state_api.claim(100)) == 1


async def test_set_budget_refuses_bad_input(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(["normalize_domain"], [company(0)])
    with pytest.raises(InvalidInput, match="budget"):
        await state_api.set_budget(batch_id, -1.0)
    with pytest.raises(NotFound):
        await state_api.set_budget(UUID(int=7), 1.0)
    with pytest.raises(InvalidInput, match="budget"):
        await state_api.create_batch(["normalize_domain"], [company(0)], budget_usd=-2.0)


async def test_a_batch_without_paid_steps_shows_no_cost(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(["normalize_domain"], [company(0)], budget_usd=3.0)
    progress = await state_api.batch_progress(batch_id)
    assert progress.cost.paid_steps == ()
    assert progress.cost.spent_usd == 0 and progress.cost.budget_usd == 3.0
    assert progress.cost.paused_reason is None and not progress.paused


async def test_a_batch_that_spent_its_budget_on_its_last_row_is_finished_not_paused(
    state_api: StateAPI, conn: Conn
) -> None:
    await add_provider(conn, cost_usd=0.5)
    await add_paid_step(conn)
    batch_id = await state_api.create_batch([PAID], [company(0), company(1)], budget_usd=1.0)
    both = await claim_start(state_api, batch_id)
    await state_api.record_costs([cost(t, 0.5) for t in both])
    await state_api.complete([StepResult(t, {}) for t in both])

    progress = await state_api.batch_progress(batch_id)
    assert progress.finished and progress.status == "COMPLETED"
    assert progress.cost.spent_usd == 1.0 and progress.cost.paused_reason is None
    assert not progress.paused
