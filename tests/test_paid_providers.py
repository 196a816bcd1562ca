"""Paid providers end to end (issue 8): the real conductor loop and local workers running a paid
step (``tests.plugins.paid``) against a provider played by respx.

- Two ``LocalRunner``s (8 workers) share one provider's rate limit: no one-second window sees more
  than requests_per_second + burst calls.
- A 429 storm slows the whole bucket and costs no attempt; a provider that always answers 429
  still ends every row FAILED.
- A budget of N calls' worth stops after N calls, shows why, and raising it finishes the batch.
- The ledger: what each call cost, once, visible only to its tenant.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
import respx
from psycopg.types.json import Jsonb

from shared.local import CHANNEL, LocalRunner
from shared.pg_state import PgStateAPI
from shared.state_api import BatchProgress, StepResult, TaskCost
from tests.plugins.paid import HANDLERS

from .contract import Conn, batch_row, company, fetch, fetch_one
from .test_rls import CLIENT_A, CLIENT_B, app_metadata_claims, as_role

URL = "https://paid.test/v1/lookup"
STEP = "paid_lookup"
PROVIDER = "paidapi"
RUN_DEADLINE = 90.0


class FakeProvider:
    """The provider's API: records when each call arrived, answers after ``latency`` seconds;
    ``rate_limited(seconds since the first call)`` says whether to answer 429 (Retry-After:
    ``retry_after``)."""

    def __init__(
        self,
        *,
        latency: float = 0.02,
        rate_limited: Callable[[float], bool] = lambda elapsed: False,
        retry_after: str = "1",
    ) -> None:
        self.latency = latency
        self.rate_limited = rate_limited
        self.retry_after = retry_after
        self.calls: list[float] = []
        self.answers: list[int] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        now = time.monotonic()
        self.calls.append(now)
        await asyncio.sleep(self.latency)
        if self.rate_limited(now - self.calls[0]):
            self.answers.append(429)
            return httpx.Response(
                429, headers={"Retry-After": self.retry_after}, json={"error": "rate limited"}
            )
        self.answers.append(200)
        return httpx.Response(200, json={"item": json.loads(request.content)["item_id"]})

    def busiest_second(self) -> int:
        """The most calls that arrived within any one-second window."""
        calls = sorted(self.calls)
        most, first = 0, 0
        for last, at in enumerate(calls):
            while at - calls[first] >= 1.0:
                first += 1
            most = max(most, last - first + 1)
        return most


async def add_provider(conn: Conn, **limits: Any) -> None:
    values = {"requests_per_second": 1000, "burst": 1000, **limits}
    columns = ", ".join(values)
    placeholders = ", ".join(["%s"] * len(values))
    await conn.execute(
        f"insert into providers (name, {columns}) values (%s, {placeholders})".encode(),
        (PROVIDER, *values.values()),
    )


async def add_paid_step(conn: Conn, **config: Any) -> None:
    settings = {
        "provider": PROVIDER,
        "url": URL,
        "cost_usd": 0.01,
        "timeout_seconds": 30,
        "max_attempts": 3,
        "backoff_seconds": 0,
        **config,
    }
    await conn.execute(
        "insert into enrichment_registry (step_name, modal_function_name, config)"
        " values (%s, 'paid_call', %s)",
        (STEP, Jsonb(settings)),
    )


@pytest.fixture
async def api(dsn: str) -> AsyncIterator[PgStateAPI]:
    async with await PgStateAPI.open(dsn, max_size=8) as state_api:
        yield state_api


@pytest.fixture
def provider_api() -> Iterator[respx.MockRouter]:
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        yield router


def runner(dsn: str, api: PgStateAPI, batch_id: UUID, **options: Any) -> LocalRunner:
    return LocalRunner(
        dsn,
        api,
        batch_ids=[batch_id],
        workers=4,
        sweep_interval=options.pop("sweep_interval", 1.0),
        handlers=HANDLERS,
        **options,
    )


async def run_to_the_end(
    runners: list[LocalRunner], api: PgStateAPI, batch_id: UUID, *, or_paused: bool = False
) -> BatchProgress:
    async def done() -> bool:
        progress = await api.batch_progress(batch_id)
        return progress.finished or (or_paused and progress.paused)

    await asyncio.wait_for(asyncio.gather(*(r.run(until=done) for r in runners)), RUN_DEADLINE)
    return await api.batch_progress(batch_id)


async def rows(conn: Conn, batch_id: UUID) -> list[dict[str, Any]]:
    return await fetch(
        conn,
        "select attempt, retry_from, status::text as status, meta from workflow_states"
        " where batch_id = %s",
        (batch_id,),
    )


async def provider_row(conn: Conn) -> dict[str, Any]:
    return await fetch_one(conn, "select * from providers where name = %s", (PROVIDER,))


# Rate limits -------------------------------------------------------------------------------------


async def test_two_runners_together_never_exceed_the_providers_rate(
    dsn: str, conn: Conn, api: PgStateAPI, provider_api: respx.MockRouter
) -> None:
    rate, burst, items = 20, 5, 80
    # The bucket starts empty. A full one lets burst + rate claims into the first second, exactly
    # the bound, and a call lags its claim by a dispatch delay that varies by a few ms, so calls
    # (what is measured here) could exceed it by one. The contract tests check the burst itself.
    await add_provider(conn, requests_per_second=rate, burst=burst, tokens=0)
    await add_paid_step(conn)
    batch_id = await api.create_batch([STEP], [company(i) for i in range(items)])
    fake = FakeProvider(latency=0.05)
    provider_api.post(URL).mock(side_effect=fake)

    # Two conductor loops with four workers each, as two processes would be: each its own pool.
    async with await PgStateAPI.open(dsn, max_size=8) as other_api:
        both = [runner(dsn, api, batch_id), runner(dsn, other_api, batch_id)]
        progress = await run_to_the_end(both, api, batch_id)

    assert progress.status == "COMPLETED" and progress.items_completed == items
    assert len(fake.calls) == items  # every item called once: no 429, no retry
    assert fake.busiest_second() <= rate + burst, sorted(fake.calls)
    assert sum(r.stats.claimed for r in both) == items
    ledger = await fetch_one(
        conn,
        "select count(*) as n, sum(usd) as usd from provider_costs where batch_id = %s",
        (batch_id,),
    )
    assert ledger["n"] == items
    assert float(ledger["usd"]) == pytest.approx(items * 0.01)
    assert float((await batch_row(conn, batch_id))["spent_usd"]) == pytest.approx(items * 0.01)
    assert (await provider_row(conn))["calls_today"] == items


async def test_a_429_storm_slows_the_provider_and_costs_no_attempt(
    dsn: str, conn: Conn, api: PgStateAPI, provider_api: respx.MockRouter
) -> None:
    items = 30
    await add_provider(conn, requests_per_second=20, burst=5, recovery_seconds=1)
    await add_paid_step(conn, max_attempts=1)  # a single 429 using up an attempt would fail a row
    batch_id = await api.create_batch([STEP], [company(i) for i in range(items)])
    # The provider answers 429 (Retry-After: 1 s) to every call in the first 1.5 s.
    fake = FakeProvider(latency=0.01, rate_limited=lambda elapsed: elapsed < 1.5)
    provider_api.post(URL).mock(side_effect=fake)

    progress = await run_to_the_end([runner(dsn, api, batch_id)], api, batch_id)

    assert progress.status == "COMPLETED" and progress.items_completed == items
    storm = fake.answers.count(429)
    assert storm >= 5 and fake.answers.count(200) == items
    states = await rows(conn, batch_id)
    # No attempt was used by a 429: each row completed on its one counted attempt.
    assert all(r["attempt"] - r["retry_from"] == 1 for r in states), states
    assert sum(r["meta"].get("rate_limited", 0) for r in states) == storm
    assert max(r["attempt"] for r in states) >= 2
    # The whole bucket held back: after the first 429 (Retry-After 1 s) almost nothing is sent
    # until that second has passed (only rows claimed before the 429 was written).
    first = fake.calls[0]
    assert sum(first + 0.3 <= t < first + 0.9 for t in fake.calls) <= 2
    bucket = await provider_row(conn)
    assert bucket["rate_limited"] >= 1 and bucket["slowdown"] >= 2
    # Nothing was billed for a 429.
    assert float((await batch_row(conn, batch_id))["spent_usd"]) == pytest.approx(items * 0.01)


async def test_a_provider_that_always_answers_429_still_ends_failed(
    dsn: str, conn: Conn, api: PgStateAPI, provider_api: respx.MockRouter
) -> None:
    items = 5
    await add_provider(conn, requests_per_second=50, burst=5, recovery_seconds=0.2)
    await add_paid_step(conn, max_rate_limited=2, max_attempts=2)
    batch_id = await api.create_batch([STEP], [company(i) for i in range(items)])
    fake = FakeProvider(latency=0.0, rate_limited=lambda elapsed: True, retry_after="0")
    provider_api.post(URL).mock(side_effect=fake)

    progress = await run_to_the_end([runner(dsn, api, batch_id)], api, batch_id)

    assert progress.status == "FAILED" and progress.items_failed == items
    # Two free deferrals, then two counted attempts per row: bounded, not forever.
    assert len(fake.calls) == items * 4
    for row in await rows(conn, batch_id):
        assert row["status"] == "FAILED"
        assert row["meta"]["rate_limited"] == 2
        assert row["attempt"] - row["retry_from"] == 2
        assert "past max_rate_limited = 2" in row["meta"]["error"]
    assert float((await batch_row(conn, batch_id))["spent_usd"]) == 0


# Budgets -----------------------------------------------------------------------------------------


async def test_a_budget_stops_after_its_calls_and_raising_it_finishes_the_batch(
    dsn: str, conn: Conn, api: PgStateAPI, provider_api: respx.MockRouter
) -> None:
    items = 20
    await add_provider(conn)
    await add_paid_step(conn, cost_usd=0.01)
    batch_id = await api.create_batch(
        [STEP], [company(i) for i in range(items)], budget_usd=0.05
    )  # five calls' worth
    fake = FakeProvider(latency=0.05)
    provider_api.post(URL).mock(side_effect=fake)

    progress = await run_to_the_end([runner(dsn, api, batch_id)], api, batch_id, or_paused=True)

    # Claims count the calls in flight at their expected cost: exactly five calls.
    assert len(fake.calls) == 5
    assert progress.paused and not progress.finished
    assert progress.cost.paused_reason == "budget reached: $0.05 of $0.05"
    assert progress.cost.spent_usd == pytest.approx(0.05)
    assert progress.cost.paid_rows_done == 5 and progress.cost.paid_rows_left == 15
    assert progress.cost.projected_rest_usd == pytest.approx(0.15)
    assert progress.steps[STEP]["PENDING"] == 15

    # A serving runner waits; raising the budget (an UPDATE, as in Studio) resumes the batch.
    serving = runner(dsn, api, batch_id)
    serve = asyncio.create_task(run_to_the_end([serving], api, batch_id))
    await conn.execute("update batches set budget_usd = 1 where id = %s", (batch_id,))
    progress = await asyncio.wait_for(serve, RUN_DEADLINE)

    assert progress.status == "COMPLETED" and progress.items_completed == items
    assert len(fake.calls) == items
    assert progress.cost.paused_reason is None
    assert progress.cost.spent_usd == pytest.approx(0.2)


async def test_raising_a_budget_wakes_the_conductor(conn: Conn, api: PgStateAPI) -> None:
    batch_id = await api.create_batch(["normalize_domain"], [company(0)], budget_usd=1)
    async with await psycopg.AsyncConnection.connect(conn.info.dsn, autocommit=True) as listener:
        await listener.execute(f"LISTEN {CHANNEL}")
        state = await api.set_budget(batch_id, 2.5)
        assert state.budget_usd == 2.5
        note = await asyncio.wait_for(anext(listener.notifies()), 10)
    payload = json.loads(note.payload)
    assert payload["op"] == "BUDGET" and payload["batch_ids"] == [str(batch_id)]


# The ledger --------------------------------------------------------------------------------------


async def test_a_tenant_sees_only_its_own_costs(conn: Conn, api: PgStateAPI) -> None:
    await add_provider(conn)
    await add_paid_step(conn)
    batches = {}
    for client in (CLIENT_A, CLIENT_B):
        batch_id = await api.create_batch([STEP], [company(0)], client_id=client, budget_usd=5)
        [claimed] = await api.claim(1, batch_ids=[batch_id])
        await api.start([claimed.task])
        assert await api.record_costs([TaskCost(claimed.task, PROVIDER, 1, 0.25)]) == 1
        await api.complete([StepResult(claimed.task, {})])
        batches[client] = batch_id

    for client, own in batches.items():
        async with as_role(conn, "authenticated", app_metadata_claims(client)):
            seen = await fetch(conn, "select batch_id, usd from provider_costs")
            assert [(r["batch_id"], float(r["usd"])) for r in seen] == [(own, 0.25)]
            [batch] = await fetch(conn, "select spent_usd, budget_usd from batches")
            assert (float(batch["spent_usd"]), float(batch["budget_usd"])) == (0.25, 5)
            # A tenant sets its own budget, never another's, and never what it spent.
            other = batches[CLIENT_B if client == CLIENT_A else CLIENT_A]
            cur = await conn.execute(
                "update batches set budget_usd = 9 where id = any(%s)", ([own, other],)
            )
            assert cur.rowcount == 1
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                async with conn.transaction():
                    await conn.execute("update batches set spent_usd = 0")
    async with as_role(conn, "anon", {"role": "anon"}):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("select * from provider_costs")
