"""Row level security and privileges, as Supabase applies them to API requests.

PostgREST runs each request in a transaction as the JWT's role with the claims in
``request.jwt.claims``; the same is done here with ``SET LOCAL ROLE`` and ``set_config(..., true)``
inside a transaction that is rolled back afterwards.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql

from shared.pg_state import PgStateAPI
from shared.state_api import StepResult

from .contract import Conn, company, fetch, fetch_one

CLIENT_A = uuid.UUID("aaaaaaaa-0000-4000-8000-000000000001")
CLIENT_B = uuid.UUID("bbbbbbbb-0000-4000-8000-000000000002")


def app_metadata_claims(client_id: uuid.UUID) -> dict[str, Any]:
    return {
        "role": "authenticated",
        "sub": str(uuid.uuid4()),
        "app_metadata": {"client_id": str(client_id)},
    }


@asynccontextmanager
async def as_role(
    conn: Conn, role: str, claims: dict[str, Any] | None = None
) -> AsyncIterator[None]:
    """Run the block as ``role`` with ``claims``; everything it does is rolled back."""
    async with conn.transaction(force_rollback=True):
        await conn.execute(sql.SQL("set local role {}").format(sql.Identifier(role)))
        if claims is not None:
            await conn.execute(
                "select set_config('request.jwt.claims', %s, true)", (json.dumps(claims),)
            )
        yield


@dataclass(frozen=True)
class Tenants:
    batch_a: uuid.UUID
    batch_b: uuid.UUID


@pytest.fixture
async def tenants(dsn: str) -> Tenants:
    """A batch per client, each with one step completed (a results row and a next-step row)."""
    async with await PgStateAPI.open(dsn, max_size=1) as api:
        batch_ids = []
        for client in (CLIENT_A, CLIENT_B):
            batch_id = await api.create_batch(
                ["normalize_domain", "clean_company_name"],
                [company(0), company(1)],
                client_id=client,
            )
            [claimed, _] = await api.claim(2, batch_ids=[batch_id])
            await api.start([claimed.task])
            await api.complete([StepResult(claimed.task, {"domain": f"{client}.example"})])
            batch_ids.append(batch_id)
    return Tenants(*batch_ids)


async def batch_ids_in(conn: Conn, table: str) -> list[uuid.UUID]:
    query = sql.SQL("select batch_id from {} order by batch_id").format(sql.Identifier(table))
    return [r["batch_id"] for r in await fetch(conn, query.as_string(conn))]


@pytest.mark.parametrize("who", ["A", "B"])
async def test_a_client_sees_only_its_own_rows(conn: Conn, tenants: Tenants, who: str) -> None:
    client, own = (CLIENT_A, tenants.batch_a) if who == "A" else (CLIENT_B, tenants.batch_b)
    # app_metadata.client_id (writable only with the service role key) names the tenant; a
    # top-level client_id (an OAuth app's id, from Supabase's OAuth 2.1 server) does not.
    for claims in (
        app_metadata_claims(client),
        {**app_metadata_claims(client), "client_id": str(uuid.uuid4())},
    ):
        async with as_role(conn, "authenticated", claims):
            assert [r["id"] for r in await fetch(conn, "select id from batches")] == [own]
            assert await batch_ids_in(conn, "batch_items") == [own, own]
            assert await batch_ids_in(conn, "workflow_states") == [own, own, own]
            assert await batch_ids_in(conn, "normalize_domain_results") == [own]
            [result] = await fetch(conn, "select domain from normalize_domain_results")
            assert result["domain"] == f"{client}.example"
            # Everyone signed in may read the step registry.
            assert len(await fetch(conn, "select step_name from enrichment_registry")) == 7
            progress = await fetch_one(conn, "select batch_progress(%s) as p", (own,))
            assert progress["p"]["items"] == 2


async def test_another_clients_batch_is_not_found(conn: Conn, tenants: Tenants) -> None:
    with pytest.raises(psycopg.Error, match="not found") as caught:
        async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
            await conn.execute("select batch_progress(%s)", (tenants.batch_b,))
    assert caught.value.sqlstate == "P0002"


async def test_a_user_without_a_client_sees_nothing(conn: Conn, tenants: Tenants) -> None:
    claims = {
        "role": "authenticated",
        "sub": str(uuid.uuid4()),
        "user_metadata": {
            "client_id": str(CLIENT_A)  # user_metadata is writable by the user: never trusted
        },
    }
    async with as_role(conn, "authenticated", claims):
        for table in ("batches", "batch_items", "workflow_states", "normalize_domain_results"):
            query = sql.SQL("select * from {}").format(sql.Identifier(table))
            assert await fetch(conn, query.as_string(conn)) == [], table


ANON_DENIED = [
    "select * from batches",
    "select * from batch_items",
    "select * from workflow_states",
    "select * from normalize_domain_results",
    "select * from enrichment_registry",
    "insert into batches (blueprint) values ('[\"step_a\"]')",
    "select create_batch('[\"step_a\"]', '[{{}}]')",
    "select batch_progress('{batch}')",
    "select * from claim_steps(10)",
]


async def test_anon_is_denied(conn: Conn, tenants: Tenants) -> None:
    for statement in ANON_DENIED:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with as_role(conn, "anon", {"role": "anon"}):
                await conn.execute(statement.format(batch=tenants.batch_a).encode())
                pytest.fail(f"anon may run: {statement}")


async def test_a_client_cannot_insert_a_batch_for_another_client(
    conn: Conn, tenants: Tenants
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
            await conn.execute(
                "insert into batches (client_id, blueprint) values (%s, '[\"step_a\"]')",
                (CLIENT_B,),
            )
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
            await conn.execute("select create_batch('[\"step_a\"]', '[{}]', %s)", (CLIENT_B,))


async def test_a_client_cannot_add_items_to_another_clients_batch(
    conn: Conn, tenants: Tenants
) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
        async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
            await conn.execute(
                "insert into batch_items (batch_id, raw_data) values (%s, '{}')",
                (tenants.batch_b,),
            )
    count = await fetch_one(
        conn, "select item_count from batches where id = %s", (tenants.batch_b,)
    )
    assert count["item_count"] == 2


async def test_a_client_creates_batches_of_its_own(conn: Conn, tenants: Tenants) -> None:
    async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
        inserted = await fetch_one(
            conn, "insert into batches (blueprint) values ('[\"step_a\"]') returning id, client_id"
        )
        assert inserted["client_id"] == CLIENT_A
        await conn.execute(
            "insert into batch_items (batch_id, raw_data) values (%s, '{}')", (inserted["id"],)
        )
        [seeded] = await fetch(
            conn,
            "select status::text as status from workflow_states where batch_id = %s",
            (inserted["id"],),
        )
        assert seeded["status"] == "PENDING"

        created = await fetch_one(
            conn, 'select create_batch(\'["step_a"]\', \'[{"a": 1}, {"a": 2}]\') as id'
        )
        owner = await fetch_one(
            conn, "select client_id, item_count from batches where id = %s", (created["id"],)
        )
        assert (owner["client_id"], owner["item_count"]) == (CLIENT_A, 2)
        assert len(await fetch(conn, "select id from batches")) == 3


CLIENT_DENIED = [
    "select * from claim_steps(10)",
    "select * from start_steps('[]')",
    "select * from complete_steps('[]')",
    "select * from fail_steps('[]')",
    "select * from heartbeat_steps('[]')",
    "select * from release_steps('[]')",
    "select mark_dispatched('[]')",
    "select * from sweep_expired_leases()",
    "select retry_failed('{batch}')",
    "select cancel_batch('{batch}')",
    "select rollup_batches(array['{batch}'::uuid])",
    "update workflow_states set status = 'COMPLETED'",
    "update batches set status = 'COMPLETED'",
    "insert into normalize_domain_results (batch_id, item_id, attempt, result)"
    " select batch_id, item_id, 9, '{{}}' from workflow_states",
    "insert into enrichment_registry (step_name, modal_function_name) values ('x', 'x')",
]


async def test_a_client_cannot_move_states(conn: Conn, tenants: Tenants) -> None:
    for statement in CLIENT_DENIED:
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
                await conn.execute(statement.format(batch=tenants.batch_a).encode())
                pytest.fail(f"a client may run: {statement}")
    rows = await fetch(
        conn, "select status::text as s, count(*) as n from workflow_states group by 1"
    )
    assert {r["s"]: r["n"] for r in rows} == {"COMPLETED": 2, "PENDING": 2, "QUEUED": 2}


async def test_a_client_renames_and_deletes_only_its_own_batches(
    conn: Conn, tenants: Tenants
) -> None:
    async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
        own = await conn.execute(
            "update batches set name = 'mine' where id = %s", (tenants.batch_a,)
        )
        other = await conn.execute(
            "update batches set name = 'theirs' where id = %s", (tenants.batch_b,)
        )
        assert (own.rowcount, other.rowcount) == (1, 0)
        deleted = await conn.execute("delete from batches where id = %s", (tenants.batch_b,))
        assert deleted.rowcount == 0
    assert len(await fetch(conn, "select id from batches")) == 2


async def test_service_role_sees_and_moves_everything(conn: Conn, tenants: Tenants) -> None:
    async with as_role(conn, "service_role", {"role": "service_role"}):
        batches = await fetch(conn, "select id from batches")
        assert {r["id"] for r in batches} == {tenants.batch_a, tenants.batch_b}
        assert len(await fetch(conn, "select * from workflow_states")) == 6
        assert len(await fetch(conn, "select * from normalize_domain_results")) == 2
        claimed = await fetch(conn, "select batch_id from claim_steps(10)")
        assert {r["batch_id"] for r in claimed} == {tenants.batch_a, tenants.batch_b}
