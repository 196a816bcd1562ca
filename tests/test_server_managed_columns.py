"""Server-managed columns of batches and items (issue 9, item 6).

A tenant (role authenticated, as PostgREST runs its requests) names only the columns it owns; a
batch's id, status, counts and timestamps are the database's. Studio's table editor (the owner)
may type them, and the row comes out as a new batch anyway.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

from .contract import Conn, fetch, fetch_one
from .test_rls import CLIENT_A, Tenants, app_metadata_claims, as_role, tenants

__all__ = ["tenants"]  # the fixture, imported for its use here

SERVER_MANAGED = [
    "status = 'COMPLETED'",
    "item_count = -100",
    "created_at = '1970-01-01'",
    "updated_at = '1970-01-01'",
    "started_at = '1970-01-01'",
    "finished_at = '1970-01-01'",
    "cancelled_at = '1970-01-01'",
    "spent_usd = 5",
    "paused_reason = 'mine'",
    f"id = '{uuid.uuid4()}'",
]


def insert_with(assignment: str) -> str:
    column, value = (part.strip() for part in assignment.split("=", 1))
    return f"insert into batches (blueprint, {column}) values ('[\"step_a\"]', {value})"


@pytest.mark.parametrize("assignment", SERVER_MANAGED)
async def test_a_tenant_cannot_set_a_server_managed_column(conn: Conn, assignment: str) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
            await conn.execute(insert_with(assignment).encode())
    assert await fetch(conn, "select id from batches") == []


async def test_a_tenant_cannot_probe_another_tenants_batch_id(conn: Conn, tenants: Tenants) -> None:
    """Naming an existing id used to answer "duplicate key", a missing one "inserted"."""
    for batch_id in (tenants.batch_b, uuid.uuid4()):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
                await conn.execute(
                    "insert into batches (id, blueprint) values (%s, '[\"step_a\"]')", (batch_id,)
                )
    # Items too: an item id is as good a probe.
    [item] = await fetch(
        conn, "select id from batch_items where batch_id = %s limit 1", (tenants.batch_b,)
    )
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
            await conn.execute(
                "insert into batch_items (id, batch_id, raw_data) values (%s, %s, '{}')",
                (item["id"], tenants.batch_a),
            )

    # What a tenant owns it still gives, and the database fills in the rest.
    async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
        batch = await fetch_one(
            conn,
            "insert into batches (client_id, name, blueprint, meta, budget_usd, use_cache)"
            " values (%s, 'mine', '[\"step_a\"]', '{\"team\": \"growth\"}', 5, false)"
            " returning id, status::text as status, item_count",
            (CLIENT_A,),
        )
        await conn.execute(
            "insert into batch_items (batch_id, raw_data) values (%s, '{\"a\": 1}')", (batch["id"],)
        )
        assert (batch["status"], batch["item_count"]) == ("PENDING", 0)
        after = await fetch_one(
            conn, "select item_count from batches where id = %s", (batch["id"],)
        )
        assert after["item_count"] == 1


async def test_a_studio_insert_gets_a_new_batchs_values_whatever_it_says(conn: Conn) -> None:
    batch = await fetch_one(
        conn,
        """
        insert into batches (blueprint, status, item_count, created_at, updated_at, started_at,
                             finished_at, cancelled_at, spent_usd, paused_reason)
        values ('["step_a"]', 'COMPLETED', -100, '1970-01-01', '1970-01-01', '1970-01-01',
                '1970-01-01', '1970-01-01', 7, 'x')
        returning status::text as status, item_count, created_at > now() - interval '1 hour'
                  as recent, updated_at > now() - interval '1 hour' as touched, started_at,
                  finished_at, cancelled_at, spent_usd, paused_reason
        """,
    )
    assert batch == {
        "status": "PENDING",
        "item_count": 0,
        "recent": True,
        "touched": True,
        "started_at": None,
        "finished_at": None,
        "cancelled_at": None,
        "spent_usd": 0,
        "paused_reason": None,
    }
