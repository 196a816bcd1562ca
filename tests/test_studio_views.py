"""The Supabase Studio views (20261201000500_studio_views.sql), read as Supabase's roles read them.

A tenant reads them as ``authenticated`` with its client id in the JWT's app_metadata (see
tests/test_rls.py for how PostgREST sets the role and claims); ``anon`` may not read them at all.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from shared.pg_state import PgStateAPI
from shared.state_api import StepFailure, StepResult, StepSubmission

from .contract import Conn, claim_and_start, company, fetch, fetch_one, register_step
from .test_rls import CLIENT_A, CLIENT_B, app_metadata_claims, as_role

VIEWS = ("studio_batch_progress", "studio_batch_items")


@dataclass(frozen=True)
class Batches:
    own: uuid.UUID  # CLIENT_A's: normalize_domain then step_async, rows in every state
    other: uuid.UUID  # CLIENT_B's
    awaiting: uuid.UUID  # own items: step_async awaits its callback,
    finished: uuid.UUID  # ... both steps COMPLETED,
    failed: uuid.UUID  # ... normalize_domain FAILED


async def build_batches(dsn: str, conn: Conn) -> Batches:
    """CLIENT_A's batch of 6 items: normalize_domain 4 COMPLETED (one skipped, one cached), 1
    FAILED, 1 IN_PROGRESS; step_async 1 awaiting its callback, 1 COMPLETED, 1 IN_PROGRESS, 1
    PENDING; spend in the ledger. CLIENT_B's batch of 2 items, one step done."""
    async with await PgStateAPI.open(dsn, max_size=1) as api:
        own = await api.create_batch(
            ["normalize_domain", "step_async"],
            [company(i) for i in range(6)],
            client_id=CLIENT_A,
            name="mine",
        )
        done_a, done_b, done_c, done_d, failed, _running = await claim_and_start(api, own)
        await api.complete(
            [
                StepResult(t, {"domain": f"company{i}.example"})
                for i, t in enumerate([done_a, done_b, done_c, done_d])
            ]
        )
        await api.fail([StepFailure(failed, "no website in this row", retryable=False)])
        submitted, completed, _running_too = await claim_and_start(api, own, limit=3)
        await api.submit([StepSubmission(submitted, "req-1")])
        await api.complete([StepResult(completed, {"answer": 42})])

        other = await api.create_batch(
            ["normalize_domain", "clean_company_name"],
            [company(10), company(11)],
            client_id=CLIENT_B,
        )
        [first, _] = await claim_and_start(api, other)
        await api.complete([StepResult(first, {"domain": "theirs.example"})])

    # What settling a condition or a cache hit leaves on a row (20261130001300); ledger rows.
    await conn.execute(
        "update workflow_states set meta = meta || %s where batch_id = %s and item_id = %s"
        " and step_name = 'normalize_domain'",
        (Jsonb({"skipped": "no domain"}), own, done_c.item_id),
    )
    await conn.execute(
        "update workflow_states set meta = meta || %s where batch_id = %s and item_id = %s"
        " and step_name = 'normalize_domain'",
        (Jsonb({"cached": {"batch_id": str(other)}}), own, done_d.item_id),
    )
    await conn.execute(
        "insert into provider_costs (batch_id, item_id, step_name, attempt, provider, units, usd,"
        " cached) values (%s, %s, 'step_async', 1, 'exa', 1, 0.50, false),"
        " (%s, %s, 'step_async', 1, 'exa', 1, 0.25, false),"
        " (%s, %s, 'normalize_domain', 1, 'exa', 0, 0, true),"
        " (%s, %s, 'normalize_domain', 1, 'exa', 1, 9, false)",
        (
            own,
            submitted.item_id,
            own,
            completed.item_id,
            own,
            done_d.item_id,
            other,
            first.item_id,
        ),
    )
    return Batches(own, other, submitted.item_id, completed.item_id, failed.item_id)


@pytest.fixture
async def batches(dsn: str, conn: Conn) -> Batches:
    return await build_batches(dsn, conn)


async def test_a_tenant_sees_only_its_own_batches_and_items(conn: Conn, batches: Batches) -> None:
    async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
        progress = await fetch(conn, "select * from studio_batch_progress order by step_number")
        items = await fetch(conn, "select * from studio_batch_items order by seq")
        raw = await fetch(
            conn, "select id, raw_data from batch_items where batch_id = %s", (batches.own,)
        )

    assert [(r["batch_id"], r["batch_name"], r["step_name"]) for r in progress] == [
        (batches.own, "mine", "normalize_domain"),
        (batches.own, "mine", "step_async"),
    ]
    assert {r["batch_id"] for r in items} == {batches.own}
    # Inputs and results side by side: each item's raw_data, and per step its status and result.
    assert {r["item_id"]: r["inputs"] for r in items} == {r["id"]: r["raw_data"] for r in raw}
    by_id = {r["item_id"]: r for r in items}
    awaiting = by_id[batches.awaiting]
    assert awaiting["steps"]["normalize_domain"]["status"] == "COMPLETED"
    assert awaiting["steps"]["normalize_domain"]["result"]["domain"].endswith(".example")
    assert awaiting["steps"]["step_async"] == {
        "status": "IN_PROGRESS",
        "attempt": 1,
        "awaiting_callback": True,
    }
    assert (awaiting["status"], awaiting["current_step"]) == ("IN_PROGRESS", "step_async")
    failed = by_id[batches.failed]
    assert (failed["status"], failed["current_step"]) == ("FAILED", "normalize_domain")
    assert failed["error"] == "normalize_domain: no website in this row"
    assert failed["steps"] == {
        "normalize_domain": {"status": "FAILED", "attempt": 1, "error": "no website in this row"}
    }
    finished = by_id[batches.finished]
    assert finished["steps"]["step_async"]["result"] == {"answer": 42}
    assert (finished["status"], finished["error"]) == ("COMPLETED", None)
    assert [r["inputs"] for r in items] == [company(i) for i in range(6)]
    assert sorted(r["status"] for r in items) == [
        "COMPLETED",
        "FAILED",
        "IN_PROGRESS",
        "IN_PROGRESS",
        "IN_PROGRESS",
        "IN_PROGRESS",
    ]

    async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_B)):
        theirs = await fetch(conn, "select batch_id, steps from studio_batch_items")
    assert {r["batch_id"] for r in theirs} == {batches.other}
    assert {r["steps"]["normalize_domain"].get("result", {}).get("domain") for r in theirs} == {
        "theirs.example",
        None,
    }


async def test_a_user_without_a_client_sees_nothing(conn: Conn, batches: Batches) -> None:
    claims = {"role": "authenticated", "sub": str(uuid.uuid4())}
    async with as_role(conn, "authenticated", claims):
        for view in VIEWS:
            assert await fetch(conn, f"select * from {view}") == [], view


async def test_anon_may_not_read_the_views(conn: Conn, batches: Batches) -> None:
    for view in VIEWS:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with as_role(conn, "anon", {"role": "anon"}):
                await conn.execute(f"select * from {view}".encode())
                pytest.fail(f"anon may read {view}")


async def test_the_service_role_sees_every_tenant(conn: Conn, batches: Batches) -> None:
    async with as_role(conn, "service_role", {"role": "service_role"}):
        rows = await fetch(conn, "select distinct batch_id from studio_batch_items")
    assert {r["batch_id"] for r in rows} == {batches.own, batches.other}


async def test_progress_counts_match_batch_progress(conn: Conn, batches: Batches) -> None:
    async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
        rows = await fetch(
            conn, "select * from studio_batch_progress where batch_id = %s", (batches.own,)
        )
        expected = (await fetch_one(conn, "select batch_progress(%s) as p", (batches.own,)))["p"]

    by_step = {r["step_name"]: r for r in rows}
    assert list(by_step) == expected["blueprint"]
    for step, counts in expected["steps"].items():
        row = by_step[step]
        assert {s: row[s.lower()] for s in counts} == counts, step
        assert row["awaiting_callback"] == expected["awaiting_callback"][step]
        assert row["skipped"] == expected["skipped"][step]
        assert row["cached"] == expected["cached"][step]
        assert row["items"] == expected["items"] == 6
    # The fixture's states, so that the comparison above compares something.
    nd, sa = by_step["normalize_domain"], by_step["step_async"]
    assert (nd["completed"], nd["failed"], nd["in_progress"], nd["skipped"], nd["cached"]) == (
        4,
        1,
        1,
        1,
        1,
    )
    assert (sa["awaiting_callback"], sa["completed"], sa["in_progress"], sa["pending"]) == (
        1,
        1,
        2,
        1,
    )
    assert (nd["percent_done"], sa["percent_done"]) == (Decimal("83.3"), Decimal("16.7"))
    # Spend per step from the ledger; together, what the batch spent.
    assert (sa["spent_usd"], sa["paid_calls"]) == (Decimal("0.75"), 2)
    assert (nd["spent_usd"], nd["paid_calls"]) == (0, 0)
    assert nd["batch_spent_usd"] == Decimal(str(expected["cost"]["spent_usd"])) == Decimal("0.75")


OTHER_TENANTS_ROWS = 20_000


def plan_nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", []):
        yield from plan_nodes(child)


@pytest.mark.parametrize("statistics", ["pinned", "measured"])
async def test_plans_reach_a_tenants_rows_through_indexes(
    conn: Conn, dsn: str, statistics: str
) -> None:
    """20,000 items of another tenant, analysed before the tenant's own batch exists (as when a
    small batch lands in a big table: it changes too few rows to trigger an autoanalyze). A
    tenant's page of items, its batch and its progress read no big table whole, with batch_id's
    n_distinct pinned (20261201000300) or as ANALYZE measures it (then the planner believes any
    batch holds about all the items, and a plain join of batches to items scans them all)."""
    if statistics == "measured":
        for table in ("batch_items", "workflow_states", "normalize_domain_results"):
            await conn.execute(
                f"alter table {table} alter column batch_id reset (n_distinct)".encode()
            )
    big = await fetch_one(
        conn,
        "insert into batches (client_id, blueprint) values (%s, '[\"normalize_domain\"]')"
        " returning id",
        (CLIENT_B,),
    )
    await conn.execute(
        "insert into batch_items (batch_id, raw_data)"
        " select %s, jsonb_build_object('website', 'c' || g || '.example')"
        " from generate_series(1, %s) g",
        (big["id"], OTHER_TENANTS_ROWS),
    )
    await conn.execute(
        "insert into normalize_domain_results (batch_id, item_id, attempt, result)"
        " select batch_id, id, 1, '{}' from batch_items where batch_id = %s",
        (big["id"],),
    )
    await conn.execute("analyze")
    batches = await build_batches(dsn, conn)

    queries = [
        "select * from studio_batch_items limit 100",
        f"select * from studio_batch_items where batch_id = '{batches.own}'",
        "select * from studio_batch_progress",
    ]
    big_tables = {"batch_items", "workflow_states", "normalize_domain_results"}
    for query in queries:
        async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
            [[[plan]]] = await (
                await conn.execute(f"explain (format json) {query}".encode())
            ).fetchall()
            rows = await fetch(conn, query)
        nodes = list(plan_nodes(plan["Plan"]))
        whole = [n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"]
        assert not big_tables & set(whole), (query, whole)
        assert {r["batch_id"] for r in rows} == {batches.own}, query
        if statistics == "pinned":
            # Estimated as cheap as it is: no JIT compilation (a quarter of a second here).
            assert plan["Plan"]["Total Cost"] < 100_000, (query, plan["Plan"]["Total Cost"])


async def test_a_new_steps_results_appear_once_registered(conn: Conn, dsn: str) -> None:
    """A results table added later joins the item view when its step is registered; one that
    signed-in users may not read is left out rather than failing the view for them."""
    for table, readable in (("shown_results", True), ("hidden_results", False)):
        await conn.execute(
            f"create table {table} (batch_id uuid not null, item_id uuid not null,"
            " attempt integer not null, result jsonb not null,"
            " updated_at timestamptz not null default now(), primary key (batch_id, item_id))"
        )
        await conn.execute(f"alter table {table} enable row level security")
        if readable:
            await conn.execute(
                f"create policy own on {table} for select to authenticated"
                " using (public.owns_batch(batch_id))"
            )
            await conn.execute(f"grant select on {table} to authenticated")
    await register_step(conn, "shown", {}, results_table="shown_results")
    await register_step(conn, "hidden", {}, results_table="hidden_results")

    async with await PgStateAPI.open(dsn, max_size=1) as api:
        batch_id = await api.create_batch(["shown", "hidden"], [company(0)], client_id=CLIENT_A)
        [shown] = await claim_and_start(api, batch_id)
        await api.complete([StepResult(shown, {"score": 7})])
        [hidden] = await claim_and_start(api, batch_id)
        await api.complete([StepResult(hidden, {"secret": 1})])

    async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
        [item] = await fetch(conn, "select status, steps from studio_batch_items")
    assert item["status"] == "COMPLETED"
    assert item["steps"] == {
        "shown": {"status": "COMPLETED", "attempt": 1, "result": {"score": 7}},
        "hidden": {"status": "COMPLETED", "attempt": 1},
    }
    # Granted afterwards: the migration that grants it refreshes the views, and then it shows.
    await conn.execute("grant select on hidden_results to authenticated")
    await conn.execute(
        "create policy own on hidden_results for select to authenticated"
        " using (public.owns_batch(batch_id))"
    )
    await conn.execute("select refresh_studio_views()")
    async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
        [item] = await fetch(conn, "select steps from studio_batch_items")
    assert item["steps"]["hidden"]["result"] == {"secret": 1}
