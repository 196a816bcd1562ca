"""The result cache and conditions (issue 8, items 4 and 5), against the real database: rows of a
step with ``config.cache`` or ``config.skip_unless`` are held at insert and settled by
``settle_without_provider`` (inside every claim) before any provider token is taken: skipped or
completed from the client's cache through ``complete_steps``, else released to the claim. respx
plays Exa; the stand-in serves two real ``enrich run`` of the same CSV."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest
import respx
from click.testing import CliRunner
from rich.console import Console

from shared.cli.batch_commands import print_progress
from shared.cli.main import main
from shared.pg_state import PgStateAPI
from shared.providers.exa import DEFAULT_BASE_URL
from shared.worker import run_chunk
from tests.contract import batch_row, configure_step, fetch, fetch_one, states, tasks
from tests.test_exa_verify import KEY, REPO, standin, stats
from tests.test_rls import app_metadata_claims, as_role

Conn = psycopg.AsyncConnection[Any]
SEARCH_URL = f"{DEFAULT_BASE_URL}/search"
HELD = "9999-01-01 00:00:00+00"
CLIENT_A = UUID("aaaaaaaa-0000-0000-0000-00000000000a")
CLIENT_B = UUID("bbbbbbbb-0000-0000-0000-00000000000b")
BLUEPRINT = ["normalize_domain", "exa_verify"]
ITEMS = [
    {"name": "Dune Networks", "website": "www.dunenetworks.fr/en-us/contact?utm=x"},
    {"name": "Oak Networks", "website": "http://oaknetworks.in/"},
    {"name": "Beacon Foods", "website": "beaconfoods.com.br"},
]
# The same company again, written differently: the same normalised key.
TWIN = {"name": "  DUNE   networks ", "website": "https://dunenetworks.fr"}

__all__ = ["standin"]  # the stand-in fixture, shared with test_exa_verify


@pytest.fixture(autouse=True)
def exa_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXA_API_KEY", KEY)
    monkeypatch.delenv("EXA_BASE_URL", raising=False)


@pytest.fixture(autouse=True)
async def roomy_exa(conn: Conn) -> None:
    """Exa's real limit (10/s) would spread these tests over claims; they are not about it."""
    await conn.execute("update providers set requests_per_second = 10000, burst = 10000")


class Exa:
    """respx's Exa: every search answered, each query counted."""

    def __init__(self) -> None:
        self.queries: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        query = json.loads(request.content)["query"]
        self.queries.append(query)
        name = " ".join(query.removesuffix(" official website").lower().split())
        site = {
            "dune networks": "https://www.dunenetworks.fr/",
            "oak networks": "https://oaknetworks.in/",
        }.get(name, "https://www.example-namesake.com/")
        body = {
            "requestId": f"req-{len(self.queries)}",
            "resolvedSearchType": "neural",
            "results": [{"url": site, "title": query, "highlights": ["Home"]}],
            "costDollars": {"total": 0.007},
        }
        return httpx.Response(200, json=body)


async def run(api: PgStateAPI, batch_id: UUID, exa: Exa) -> int:
    """Run the batch to its end with the local worker code; returns the exa_verify rows claimed
    (the rows that reached Exa)."""
    reached = 0
    with respx.mock:
        respx.post(SEARCH_URL).mock(side_effect=exa)
        for _ in range(10):
            claimed = await api.claim(1000, batch_ids=[batch_id])
            if not claimed:
                break
            for function in sorted({c.function_name for c in claimed}):
                chunk = [c.task for c in claimed if c.function_name == function]
                reached += len(chunk) if function == "exa_verify" else 0
                await run_chunk(api, function, chunk)
    return reached


async def exa_results(conn: Conn, batch_id: UUID) -> dict[str, dict[str, Any]]:
    rows = await fetch(
        conn,
        "select bi.raw_data ->> 'name' as name, r.result from exa_verify_results r"
        " join batch_items bi on bi.id = r.item_id where r.batch_id = %s",
        (batch_id,),
    )
    return {row["name"]: row["result"] for row in rows}


async def results_by_item(conn: Conn, batch_id: UUID) -> dict[str, dict[str, Any]]:
    rows = await fetch(
        conn, "select item_id, result from exa_verify_results where batch_id = %s", (batch_id,)
    )
    return {str(row["item_id"]): row["result"] for row in rows}


async def ledger(conn: Conn, batch_id: UUID) -> list[dict[str, Any]]:
    return await fetch(
        conn,
        "select step_name, attempt, provider, units, usd, cached from provider_costs"
        " where batch_id = %s order by item_id",
        (batch_id,),
    )


# The cache -------------------------------------------------------------------------------------


async def test_the_same_list_again_is_served_from_the_cache(api: PgStateAPI, conn: Conn) -> None:
    exa = Exa()
    first = await api.create_batch(BLUEPRINT, [*ITEMS, TWIN], client_id=CLIENT_A)
    assert await run(api, first, exa) == 4  # the twin was held with its original: both paid
    assert len(exa.queries) == 4
    entries = await fetch(conn, "select * from result_cache order by source_item_id")
    assert len(entries) == 3  # the twin's result is the same entry
    assert {e["client_id"] for e in entries} == {CLIENT_A}
    assert {e["step_name"] for e in entries} == {"exa_verify"}
    dune = next(
        e for e in entries if e["key_values"]["normalize_domain.domain"] == "dunenetworks.fr"
    )
    assert dune["key_values"] == {
        "normalize_domain.domain": "dunenetworks.fr",
        "name": "dune networks",
    }
    assert dune["source_batch_id"] == first
    assert 29 <= (dune["expires_at"] - dune["created_at"]).days <= 30  # the seed's 30 days

    second = await api.create_batch(BLUEPRINT, [TWIN, *ITEMS], client_id=CLIENT_A)
    assert await run(api, second, exa) == 0
    assert len(exa.queries) == 4  # not one more search

    progress = await api.batch_progress(second)
    assert progress.status == "COMPLETED" and progress.steps["exa_verify"]["COMPLETED"] == 4
    paid = await results_by_item(conn, first)
    for result in (await results_by_item(conn, second)).values():
        source = result.pop("cached_from")
        assert source["batch_id"] == str(first)
        assert result == paid[source["item_id"]]  # what was paid for, as it was
    rows = await states(conn, second, "exa_verify")
    assert {r["status"] for r in rows} == {"COMPLETED"}
    assert {r["attempt"] for r in rows} == {1}
    assert {r["meta"]["cached"]["batch_id"] for r in rows} == {str(first)}
    assert all(r["lease_owner"] is None and r["lease_expires_at"] is None for r in rows)
    costs = await ledger(conn, second)
    assert [(c["step_name"], c["provider"], c["usd"], c["cached"]) for c in costs] == [
        ("exa_verify", "exa", 0, True)
    ] * 4
    assert (await batch_row(conn, second))["spent_usd"] == 0


async def test_another_client_makes_its_own_calls(api: PgStateAPI, conn: Conn) -> None:
    exa = Exa()
    await run(api, await api.create_batch(BLUEPRINT, ITEMS, client_id=CLIENT_A), exa)
    other = await api.create_batch(BLUEPRINT, ITEMS, client_id=CLIENT_B)
    assert await run(api, other, exa) == 3
    assert len(exa.queries) == 6
    assert all("cached_from" not in r for r in (await exa_results(conn, other)).values())
    clients = await fetch(
        conn, "select client_id, count(*) from result_cache group by 1 order by 1"
    )
    assert [(c["client_id"], c["count"]) for c in clients] == [(CLIENT_A, 3), (CLIENT_B, 3)]


async def test_without_the_cache_a_batch_pays_and_refreshes_it(api: PgStateAPI, conn: Conn) -> None:
    exa = Exa()
    await run(api, await api.create_batch(BLUEPRINT, ITEMS, client_id=CLIENT_A), exa)
    fresh = await api.create_batch(BLUEPRINT, ITEMS, client_id=CLIENT_A)
    await conn.execute("update batches set use_cache = false where id = %s", (fresh,))
    assert await run(api, fresh, exa) == 3
    sources = await fetch(conn, "select distinct source_batch_id from result_cache")
    assert [s["source_batch_id"] for s in sources] == [fresh]  # the newest answer wins


async def test_an_expired_entry_is_not_used(api: PgStateAPI, conn: Conn) -> None:
    exa = Exa()
    await run(api, await api.create_batch(BLUEPRINT, ITEMS[:1], client_id=CLIENT_A), exa)
    await conn.execute("update result_cache set expires_at = now() - interval '1 second'")
    assert (
        await run(api, await api.create_batch(BLUEPRINT, ITEMS[:1], client_id=CLIENT_A), exa) == 1
    )
    [entry] = await fetch(conn, "select expires_at > now() as live from result_cache")
    assert entry["live"]  # stored again
    await conn.execute("update result_cache set expires_at = now() - interval '1 second'")
    assert await conn.execute("select purge_result_cache()") is not None
    assert await fetch(conn, "select * from result_cache") == []


async def test_failures_are_not_cached(api: PgStateAPI, conn: Conn) -> None:
    await configure_step(conn, "exa_verify", max_attempts=1)
    batch_id = await api.create_batch(BLUEPRINT, ITEMS[:1], client_id=CLIENT_A)
    with respx.mock:
        respx.post(SEARCH_URL).mock(return_value=httpx.Response(500))
        for _ in range(3):
            for claimed in [await api.claim(100, batch_ids=[batch_id])]:
                for function in {c.function_name for c in claimed}:
                    await run_chunk(
                        api, function, [c.task for c in claimed if c.function_name == function]
                    )
    assert (await api.batch_progress(batch_id)).steps["exa_verify"]["FAILED"] == 1
    assert await fetch(conn, "select * from result_cache") == []


async def test_without_normalize_domain_nothing_is_cached_or_skipped(
    api: PgStateAPI, conn: Conn
) -> None:
    # The key and the condition read normalize_domain's result, which this blueprint lacks: the
    # condition says nothing, and a key it cannot read caches nothing (the raw website is not
    # the normalised domain the key stands for).
    exa = Exa()
    for _ in range(2):
        batch_id = await api.create_batch(["exa_verify"], ITEMS[:2], client_id=CLIENT_A)
        assert await run(api, batch_id, exa) == 2
    assert await fetch(conn, "select * from result_cache") == []
    assert sorted(r["domain"] for r in (await exa_results(conn, batch_id)).values()) == [
        "dunenetworks.fr",
        "oaknetworks.in",
    ]


# Conditions ---------------------------------------------------------------------------------------


async def test_no_domain_found_means_exa_is_not_paid(api: PgStateAPI, conn: Conn) -> None:
    await configure_step(conn, "normalize_domain", allow_missing=True)
    exa = Exa()
    nowhere = {"name": "Nowhere Ltd", "email": "ceo@gmail.com"}
    batch_id = await api.create_batch(BLUEPRINT, [ITEMS[0], nowhere], client_id=CLIENT_A)

    assert await run(api, batch_id, exa) == 1
    assert exa.queries == ["Dune Networks official website"]
    rows = {r["raw_data"]["name"]: r for r in await states(conn, batch_id, "exa_verify")}
    skipped = rows["Nowhere Ltd"]
    assert (skipped["status"], skipped["attempt"]) == ("COMPLETED", 1)
    assert skipped["meta"]["skipped"] == "no normalize_domain.domain"
    assert skipped["lease_owner"] is None
    assert "skipped" not in rows["Dune Networks"]["meta"]
    results = await exa_results(conn, batch_id)
    assert results["Nowhere Ltd"] == {"skipped": "no normalize_domain.domain"}
    [skipped_row] = await fetch(
        conn,
        "select verified, domain from exa_verify_results where item_id = %s",
        (skipped["item_id"],),
    )
    assert (skipped_row["verified"], skipped_row["domain"]) == (None, None)
    costs = await ledger(conn, batch_id)
    assert [(c["step_name"], c["cached"]) for c in costs if c["step_name"] == "exa_verify"] in (
        [],  # the worker's ledger is another part's: only the paid row may be there
        [("exa_verify", False)],
    )
    assert (await batch_row(conn, batch_id))["status"] == "COMPLETED"
    # A skipped row is no answer to cache.
    entries = await fetch(conn, "select key_values from result_cache")
    assert [e["key_values"]["normalize_domain.domain"] for e in entries] == ["dunenetworks.fr"]


async def test_a_raw_field_condition_on_a_first_step(api: PgStateAPI, conn: Conn) -> None:
    await configure_step(conn, "step_a", skip_unless=["linkedin_url", "website"], sleep_ms=0)
    batch_id = await api.create_batch(
        ["step_a", "step_b"],
        [{"name": "a", "website": "  "}, {"name": "b", "linkedin_url": "x"}],
    )
    held = await fetch(
        conn,
        "select count(*) from workflow_states where batch_id = %s and run_after = %s",
        (batch_id, HELD),
    )
    assert held[0]["count"] == 2  # nobody claims them before they are looked at
    claimed = await api.claim(10, batch_ids=[batch_id])
    rows = {r["raw_data"]["name"]: r for r in await states(conn, batch_id, "step_a")}
    assert rows["a"]["meta"]["skipped"] == "no linkedin_url or website"
    assert rows["a"]["status"] == "COMPLETED"
    # b's step_a is claimed; a's skip went through the real completion path, which seeded its
    # step_b, ready in the same claim.
    by_item = {c.task.item_id: c.task.step_name for c in claimed}
    assert by_item == {rows["b"]["item_id"]: "step_a", rows["a"]["item_id"]: "step_b"}


# Holding follows the registry -------------------------------------------------------------------


async def held_count(conn: Conn, batch_id: UUID) -> int:
    row = await fetch_one(
        conn,
        "select count(*) as n from workflow_states where batch_id = %s and run_after = %s",
        (batch_id, HELD),
    )
    return int(row["n"])


async def test_rows_are_held_only_for_settling_steps(api: PgStateAPI, conn: Conn) -> None:
    plain = await api.create_batch(["step_a"], [{"a": 1}])
    assert await held_count(conn, plain) == 0
    await configure_step(conn, "step_a", skip_unless=["a"])
    held = await api.create_batch(["step_a"], [{"a": 1}, {"a": 2}])
    assert await held_count(conn, held) == 2
    # The step stops settling: what it held is ready at once, and nothing more is held.
    await conn.execute(
        "update enrichment_registry set config = config - 'skip_unless' where step_name = 'step_a'"
    )
    assert await held_count(conn, held) == 0
    assert await held_count(conn, await api.create_batch(["step_a"], [{"a": 3}])) == 0
    assert len(await api.claim(10, batch_ids=[held])) == 2


async def test_concurrent_claims_settle_each_row_once(api: PgStateAPI, conn: Conn) -> None:
    exa = Exa()
    await run(api, await api.create_batch(BLUEPRINT, ITEMS, client_id=CLIENT_A), exa)
    items = [ITEMS[i % 3] for i in range(300)]
    batch_id = await api.create_batch(BLUEPRINT, items, client_id=CLIENT_A)
    await run_chunk(api, "normalize_domain", tasks(await api.claim(1000, batch_ids=[batch_id])))
    async with await PgStateAPI.open(api_dsn(conn)) as other:
        got = await asyncio.gather(*(c.claim(50, batch_ids=[batch_id]) for c in (api, other, api)))
    assert all(g == [] for g in got)
    assert (await api.batch_progress(batch_id)).steps["exa_verify"]["COMPLETED"] == 300
    costs = await ledger(conn, batch_id)
    assert len(costs) == 300 and all(c["cached"] and c["attempt"] == 1 for c in costs)


def api_dsn(conn: Conn) -> str:
    return conn.info.dsn


# The registry refuses what it could not use ----------------------------------------------------


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"cache": {"ttl_seconds": 0, "key": ["name"]}}, "config.cache"),
        ({"cache": {"ttl_seconds": 10}}, "config.cache"),
        ({"cache": {"ttl_seconds": 10, "key": []}}, "config.cache"),
        ({"cache": {"ttl_seconds": 10, "key": ["name", 3]}}, "is not a path"),
        ({"cache": {"ttl_seconds": 10, "key": ["nosuchstep.domain"]}}, "does not name a key"),
        ({"cache": {"ttl_seconds": 10, "key": ["normalize_domain."]}}, "does not name a key"),
        ({"skip_unless": "name"}, "config.skip_unless"),
        ({"skip_unless": []}, "config.skip_unless"),
        ({"skip_unless": [" "]}, "is not a path"),
    ],
)
async def test_bad_cache_and_condition_configs(
    conn: Conn, config: dict[str, Any], message: str
) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
        await configure_step(conn, "step_a", **config)


# enrich run, twice, against the stand-in ------------------------------------------------------


def test_running_the_same_csv_again_costs_no_call(
    db: str, standin: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EXA_BASE_URL", standin)
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("update providers set requests_per_second = 10000, burst = 10000")
    rows = (REPO / "examples" / "companies.csv").read_text(encoding="utf-8").splitlines()[:31]
    source = tmp_path / "companies.csv"
    source.write_text("\n".join(rows) + "\n", encoding="utf-8")

    def enrich_run(*extra: str) -> None:
        result = CliRunner().invoke(
            main,
            ["run", str(source), "--steps", "normalize_domain,exa_verify", *extra],
            catch_exceptions=False,
        )
        assert result.exit_code in (0, 3), result.output

    enrich_run()
    paid = stats(standin)["searches"]
    assert paid > 0
    enrich_run()
    assert stats(standin)["searches"] == paid  # zero calls
    enrich_run("--client-id", str(CLIENT_B))
    assert stats(standin)["searches"] == 2 * paid  # another client pays for its own
    enrich_run("--no-cache")
    assert stats(standin)["searches"] == 3 * paid  # fresh calls when asked

    with psycopg.connect(db) as conn:
        batches = conn.execute(
            "select b.id, count(ws.*) filter (where ws.meta ? 'cached') from batches b"
            " join workflow_states ws on ws.batch_id = b.id and ws.step_name = 'exa_verify'"
            " group by b.id, b.created_at order by b.created_at"
        ).fetchall()
        same = conn.execute(
            "select count(*) from exa_verify_results a join exa_verify_results b"
            " on a.batch_id = %s and b.batch_id = %s and a.domain = b.domain"
            " and a.result = b.result - 'cached_from'",
            (batches[0][0], batches[1][0]),
        ).fetchone()
    assert [b[1] for b in batches] == [0, paid, 0, 0]
    assert same is not None and same[0] == paid  # the same results as the paid run


# Status and export -------------------------------------------------------------------------------


async def test_status_and_export_show_skipped_and_cached_rows(
    api: PgStateAPI, conn: Conn, db: str, tmp_path: Path
) -> None:
    await configure_step(conn, "normalize_domain", allow_missing=True)
    exa = Exa()
    nowhere = {"name": "Nowhere Ltd", "email": "ceo@gmail.com"}
    await run(api, await api.create_batch(BLUEPRINT, ITEMS[:1], client_id=CLIENT_A), exa)
    batch_id = await api.create_batch(BLUEPRINT, [ITEMS[0], nowhere, ITEMS[1]], client_id=CLIENT_A)
    await run(api, batch_id, exa)

    def enrich(*args: str) -> Any:  # the CLI runs its own event loop: not on this one
        return asyncio.to_thread(CliRunner().invoke, main, list(args), catch_exceptions=False)

    status = await enrich("status", str(batch_id), "--json")
    shown = json.loads(status.stdout)
    assert shown["steps"]["exa_verify"]["COMPLETED"] == 3
    assert (shown["skipped"], shown["cached"]) == (
        {"normalize_domain": 0, "exa_verify": 1},
        {"normalize_domain": 0, "exa_verify": 1},
    )
    table = (await enrich("status", str(batch_id))).stdout
    assert "SKIPPED" in table and "CACHED" in table
    # all eight columns fit an 80-column terminal, nothing cut
    terminal = Console(width=80, file=io.StringIO(), force_terminal=True, color_system=None)
    print_progress(terminal, await api.batch_progress(batch_id))
    shown_80 = terminal.file.getvalue()  # type: ignore[attr-defined]
    assert "…" not in shown_80 and max(map(len, shown_80.splitlines())) <= 80
    for word in ("normalize_domain", "IN_PROGRESS", "COMPLETED", "SKIPPED", "CACHED", "FAILED"):
        assert word in shown_80.split()

    out = tmp_path / "out.csv"
    exported = await enrich("export", str(batch_id), "-o", str(out), "--all-columns")
    assert exported.exit_code == 0, exported.output
    rows = {r["name"]: r for r in csv.DictReader(out.open(encoding="utf-8"))}
    assert rows["Nowhere Ltd"]["exa_verify: status"] == "skipped (no normalize_domain.domain)"
    assert rows["Dune Networks"]["exa_verify: status"] == "completed"
    cached = json.loads(rows["Dune Networks"]["exa_verify: result (JSON)"])["cached_from"]
    assert cached["batch_id"] != str(batch_id)
    paid = json.loads(rows["Oak Networks"]["exa_verify: result (JSON)"])
    assert "cached_from" not in paid  # paid for in this batch
    assert rows["Oak Networks"]["exa_verify: verified"] == "true"


# Tenancy in the database -------------------------------------------------------------------------


async def test_a_signed_in_client_reads_only_its_own_cache(api: PgStateAPI, conn: Conn) -> None:
    exa = Exa()
    await run(api, await api.create_batch(BLUEPRINT, ITEMS[:1], client_id=CLIENT_A), exa)
    await run(api, await api.create_batch(BLUEPRINT, ITEMS[1:2], client_id=CLIENT_B), exa)
    async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
        own = await fetch(conn, "select client_id, key_values from result_cache")
    assert [(r["client_id"], r["key_values"]["name"]) for r in own] == [(CLIENT_A, "dune networks")]
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with as_role(conn, "anon", {"role": "anon"}):
            await conn.execute("select * from result_cache")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
            await conn.execute("delete from result_cache")
