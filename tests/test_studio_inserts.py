"""Plain SQL, as Supabase Studio or any SQL client writes it, starts the workflow too.

No ids and no timestamps are given: the server defaults fill them. Triggers validate the
blueprint against the registry and seed each item's first step as PENDING.
"""

from __future__ import annotations

import uuid

import psycopg
import pytest

from shared.pg_state import PgStateAPI
from shared.state_api import StepResult

from .contract import Conn, batch_row, fetch, fetch_one, states, table_count

NIL_CLIENT = uuid.UUID(int=0)


async def insert_batch(conn: Conn, blueprint: str) -> uuid.UUID:
    row = await fetch_one(
        conn, "insert into batches (blueprint) values (%s::jsonb) returning id", (blueprint,)
    )
    batch_id: uuid.UUID = row["id"]
    return batch_id


async def test_raw_inserts_seed_the_first_step(conn: Conn) -> None:
    batch = await fetch_one(
        conn,
        """
        insert into batches (blueprint)
        values ('["normalize_domain", "clean_company_name"]')
        returning id, client_id, status::text as status, item_count, created_at
        """,
    )
    assert batch["id"] is not None and batch["created_at"] is not None
    assert (batch["client_id"], batch["status"], batch["item_count"]) == (NIL_CLIENT, "PENDING", 0)
    assert await states(conn, batch["id"]) == []

    await conn.execute(
        """
        insert into batch_items (batch_id, raw_data) values
          (%(b)s, '{"website": "acme.com", "name": "Acme"}'),
          (%(b)s, '{"website": "globex.com", "name": "Globex"}')
        """,
        {"b": batch["id"]},
    )

    rows = await states(conn, batch["id"])
    assert [r["raw_data"]["name"] for r in rows] == ["Acme", "Globex"]
    for row in rows:
        assert (row["step_name"], row["step_index"], row["status"]) == (
            "normalize_domain",
            0,
            "PENDING",
        )
        assert row["attempt"] == 0
        assert row["item_id"] is not None and row["created_at"] is not None
    assert (await batch_row(conn, batch["id"]))["item_count"] == 2

    # A second statement adds to the same batch.
    await conn.execute(
        'insert into batch_items (batch_id, raw_data) values (%s, \'{"website": "initech.com"}\')',
        (batch["id"],),
    )
    assert len(await states(conn, batch["id"])) == 3
    assert (await batch_row(conn, batch["id"]))["item_count"] == 3


async def test_a_batch_without_items_waits(conn: Conn, dsn: str) -> None:
    batch_id = await insert_batch(conn, '["step_a", "step_b"]')

    async with await PgStateAPI.open(dsn, max_size=1) as api:
        assert await api.sweep_expired_leases() == []
        progress = await api.batch_progress(batch_id)

    # Nothing to run is not "finished": items may still be inserted.
    assert (progress.status, progress.items, progress.finished) == ("PENDING", 0, False)
    assert progress.steps["step_a"]["PENDING"] == 0
    assert (await batch_row(conn, batch_id))["finished_at"] is None


async def test_raw_batch_is_picked_up_by_the_state_api(conn: Conn, dsn: str) -> None:
    batch_id = await insert_batch(conn, '["step_a"]')
    await conn.execute(
        "insert into batch_items (batch_id, raw_data) select %s, jsonb_build_object('n', g)"
        " from generate_series(1, 5) g",
        (batch_id,),
    )

    async with await PgStateAPI.open(dsn, max_size=1) as api:
        claimed = await api.claim(100)
        assert {c.task.batch_id for c in claimed} == {batch_id}
        assert len(claimed) == 5
        started = await api.start([c.task for c in claimed])
        assert sorted(s.raw_data["n"] for s in started if s.raw_data) == [1, 2, 3, 4, 5]
        await api.complete([StepResult(s.task, {}) for s in started])
        assert (await api.batch_progress(batch_id)).status == "COMPLETED"


async def test_one_insert_for_several_batches_seeds_each_with_its_own_first_step(
    conn: Conn,
) -> None:
    first = await insert_batch(conn, '["step_a", "step_b"]')
    second = await insert_batch(conn, '["step_b"]')

    await conn.execute(
        "insert into batch_items (batch_id, raw_data) values (%s, '{}'), (%s, '{}'), (%s, '{}')",
        (first, second, second),
    )

    assert [r["step_name"] for r in await states(conn, first)] == ["step_a"]
    assert [r["step_name"] for r in await states(conn, second)] == ["step_b", "step_b"]
    assert (await batch_row(conn, first))["item_count"] == 1
    assert (await batch_row(conn, second))["item_count"] == 2


async def test_copy_into_batch_items_seeds_the_first_step(conn: Conn) -> None:
    batch_id = await insert_batch(conn, '["step_a"]')
    cur = conn.cursor()
    async with cur.copy("copy batch_items (batch_id, raw_data) from stdin") as copy:
        for i in range(100):
            await copy.write_row((str(batch_id), f'{{"row": {i}}}'))

    rows = await states(conn, batch_id)
    assert len(rows) == 100
    assert {r["status"] for r in rows} == {"PENDING"}
    assert (await batch_row(conn, batch_id))["item_count"] == 100


BAD_BLUEPRINTS = [
    ('["step_a", "enrich_with_clay"]', 'step "enrich_with_clay" is not in enrichment_registry'),
    ("[]", "blueprint is empty"),
    ('["step_a", "step_a"]', 'names step "step_a" more than once'),
    ('"step_a"', "blueprint must be a JSON array"),
    ('["step_a", 2]', "element 2 is not a step name"),
]


async def test_raw_insert_of_a_bad_blueprint_is_refused(conn: Conn) -> None:
    for blueprint, message in BAD_BLUEPRINTS:
        with pytest.raises(psycopg.Error, match=message) as caught:
            await insert_batch(conn, blueprint)
        assert caught.value.sqlstate == "22023", blueprint
        assert await table_count(conn, "batches") == 0


async def test_blueprint_cannot_change(conn: Conn) -> None:
    batch_id = await insert_batch(conn, '["step_a"]')

    with pytest.raises(psycopg.Error, match="cannot change") as caught:
        await conn.execute(
            "update batches set blueprint = '[\"step_b\"]' where id = %s", (batch_id,)
        )

    assert caught.value.sqlstate == "22023"
    assert (await batch_row(conn, batch_id))["blueprint"] == ["step_a"]
    # Other columns stay editable, and rewriting the same blueprint is no change.
    await conn.execute(
        "update batches set name = 'renamed', blueprint = blueprint where id = %s", (batch_id,)
    )
    assert (await batch_row(conn, batch_id))["name"] == "renamed"


async def test_items_cannot_be_added_to_a_cancelled_batch(conn: Conn, dsn: str) -> None:
    batch_id = await insert_batch(conn, '["step_a"]')
    await conn.execute(
        "insert into batch_items (batch_id, raw_data) values (%s, '{}')", (batch_id,)
    )
    async with await PgStateAPI.open(dsn, max_size=1) as api:
        assert await api.cancel_batch(batch_id) == 1

    with pytest.raises(psycopg.Error, match="is cancelled") as caught:
        await conn.execute(
            "insert into batch_items (batch_id, raw_data) values (%s, '{}')", (batch_id,)
        )

    assert caught.value.sqlstate == "22023"
    assert await table_count(conn, "batch_items") == 1
    assert (await batch_row(conn, batch_id))["item_count"] == 1


async def test_new_items_reopen_a_finished_batch(conn: Conn, dsn: str) -> None:
    batch_id = await insert_batch(conn, '["step_a"]')
    await conn.execute(
        "insert into batch_items (batch_id, raw_data) values (%s, '{}')", (batch_id,)
    )
    async with await PgStateAPI.open(dsn, max_size=1) as api:
        [claimed] = await api.claim(10)
        await api.start([claimed.task])
        await api.complete([StepResult(claimed.task, {})])
        assert (await api.batch_progress(batch_id)).status == "COMPLETED"

        await conn.execute(
            "insert into batch_items (batch_id, raw_data) values (%s, '{\"late\": true}')",
            (batch_id,),
        )

        batch = await batch_row(conn, batch_id)
        assert (batch["status"], batch["finished_at"], batch["item_count"]) == (
            "IN_PROGRESS",
            None,
            2,
        )
        [late] = await api.claim(10)
        await api.start([late.task])
        await api.complete([StepResult(late.task, {})])
        assert (await api.batch_progress(batch_id)).status == "COMPLETED"


async def test_item_raw_data_must_be_an_object(conn: Conn) -> None:
    batch_id = await insert_batch(conn, '["step_a"]')
    for raw_data in ('"acme.com"', "[1, 2]", "null"):
        with pytest.raises(psycopg.errors.IntegrityError):
            await conn.execute(
                "insert into batch_items (batch_id, raw_data) values (%s, %s::jsonb)",
                (batch_id, raw_data),
            )
    assert await fetch(conn, "select * from workflow_states") == []
    assert (await batch_row(conn, batch_id))["item_count"] == 0
