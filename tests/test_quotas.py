"""Quotas in SQL (issue 9, item 2): every way in obeys them, each refusal is clear, nothing stays.

The limits are enrichment_settings rows; a refusal is SQLSTATE 23514 with the setting as the
constraint name and the value, the limit and the setting in the message. Tests lower a limit to
keep their data small, except where the repro is about the generous defaults themselves.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner
from psycopg.types.json import Jsonb

from shared.cli.main import main
from shared.errors import QuotaExceeded
from shared.importer import import_csv
from shared.pg_state import PgStateAPI
from shared.settings import get_settings
from shared.state_api import StepResult

from .contract import Conn, company, fetch, fetch_one
from .test_rls import CLIENT_A, CLIENT_B, app_metadata_claims, as_role

MB = 1024 * 1024
NEW_BATCH = "insert into batches (blueprint) values ('[\"step_a\"]') returning id"


async def set_quota(conn: Conn, key: str, value: int) -> None:
    done = await conn.execute(
        "update enrichment_settings set value = %s where key = %s", (str(value), key)
    )
    assert done.rowcount == 1, f"no setting {key}"


async def row_counts(conn: Conn) -> tuple[int, int, int]:
    row = await fetch_one(
        conn,
        "select (select count(*) from batches) as b, (select count(*) from batch_items) as i,"
        " (select count(*) from workflow_states) as s",
    )
    return row["b"], row["i"], row["s"]


def assert_quota_error(exc: psycopg.Error, key: str, value: int, limit: int) -> None:
    assert exc.sqlstate == "23514"
    assert exc.diag.constraint_name == key
    message = exc.diag.message_primary or ""
    assert message.startswith("quota exceeded: ")
    assert f" {value} " in message and f"the limit is {limit} " in message, message
    assert f"(enrichment_settings.{key})" in message, message


async def test_the_limits_are_settings_with_generous_defaults(conn: Conn) -> None:
    rows = await fetch(
        conn,
        "select key, value::bigint as value from enrichment_settings where key like 'quota_%%'",
    )
    limits = {r["key"]: r["value"] for r in rows}
    assert limits == {
        "quota_items_per_batch": 2_000_000,
        "quota_item_bytes": MB,
        "quota_batch_name_chars": 1000,
        "quota_batch_meta_bytes": MB,
        "quota_unfinished_rows_per_client": 10_000_000,
    }


async def test_a_20_mb_item_is_refused_by_default(conn: Conn) -> None:
    batch = await fetch_one(conn, NEW_BATCH)
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        await conn.execute(
            "insert into batch_items (batch_id, raw_data) values"
            ' (%(b)s, \'{"name": "small"}\'),'
            " (%(b)s, jsonb_build_object('notes', repeat('x', 20 * 1024 * 1024)))",
            {"b": batch["id"]},
        )
    size = await fetch_one(
        conn,
        "select pg_column_size(jsonb_build_object('notes', repeat('x', 20 * 1024 * 1024))) as n",
    )
    assert size["n"] > 20 * MB
    assert_quota_error(caught.value, "quota_item_bytes", size["n"], MB)
    assert "item 2 of this insert" in str(caught.value)
    assert await row_counts(conn) == (1, 0, 0)


async def test_a_10_mb_name_or_meta_is_refused_by_default(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        await conn.execute(
            "insert into batches (blueprint, name) values ('[\"step_a\"]', repeat('n', 10000000))"
        )
    assert_quota_error(caught.value, "quota_batch_name_chars", 10_000_000, 1000)
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        await conn.execute(
            "insert into batches (blueprint, meta)"
            " values ('[\"step_a\"]', jsonb_build_object('m', repeat('n', 10000000)))"
        )
    size = await fetch_one(
        conn, "select pg_column_size(jsonb_build_object('m', repeat('n', 10000000))) as n"
    )
    assert_quota_error(caught.value, "quota_batch_meta_bytes", size["n"], MB)
    assert await row_counts(conn) == (0, 0, 0)

    # An update that grows them is refused too.
    batch = await fetch_one(conn, NEW_BATCH)
    with pytest.raises(psycopg.errors.CheckViolation):
        await conn.execute(
            "update batches set meta = jsonb_build_object('m', repeat('n', 2 * 1024 * 1024))"
            " where id = %s",
            (batch["id"],),
        )


async def test_items_per_batch_hold_for_create_batch_and_plain_inserts(
    conn: Conn, api: PgStateAPI
) -> None:
    await set_quota(conn, "quota_items_per_batch", 3)
    with pytest.raises(QuotaExceeded, match=r"is 4 items; the limit is 3 .*quota_items_per_batch"):
        await api.create_batch(["step_a"], [company(i) for i in range(4)])
    assert await row_counts(conn) == (0, 0, 0)

    batch_id = await api.create_batch(["step_a"], [company(i) for i in range(2)])
    await conn.execute(
        "insert into batch_items (batch_id, raw_data) values (%s, '{}')", (batch_id,)
    )
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        await conn.execute(
            "insert into batch_items (batch_id, raw_data) values (%s, '{}')", (batch_id,)
        )
    assert_quota_error(caught.value, "quota_items_per_batch", 4, 3)
    assert await row_counts(conn) == (1, 3, 3)


async def test_unfinished_rows_per_client(conn: Conn, api: PgStateAPI) -> None:
    await set_quota(conn, "quota_unfinished_rows_per_client", 5)
    first = await api.create_batch(["step_a"], [company(i) for i in range(4)], client_id=CLIENT_A)
    with pytest.raises(QuotaExceeded, match=r"client .* is 6 rows; the limit is 5"):
        await api.create_batch(["step_a"], [company(i) for i in range(2)], client_id=CLIENT_A)
    # Another client has its own allowance.
    await api.create_batch(["step_a"], [company(i) for i in range(5)], client_id=CLIENT_B)

    # Finished rows no longer count, even while their batch is unfinished (the exact count).
    claimed = await api.claim(3, batch_ids=[first])
    started = await api.start([c.task for c in claimed])
    await api.complete([StepResult(s.task, {}) for s in started])
    await api.create_batch(["step_a"], [company(i) for i in range(4)], client_id=CLIENT_A)
    with pytest.raises(QuotaExceeded):
        await api.create_batch(["step_a"], [company(0)], client_id=CLIENT_A)

    # A cancelled batch's rows are finished (FAILED): room again.
    await api.cancel_batch(first)
    await api.create_batch(["step_a"], [company(0)], client_id=CLIENT_A)


async def test_a_tenant_obeys_the_quotas_too(conn: Conn) -> None:
    await set_quota(conn, "quota_items_per_batch", 1)
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
            await conn.execute('select create_batch(\'["step_a"]\', \'[{"a": 1}, {"a": 2}]\')')
    assert_quota_error(caught.value, "quota_items_per_batch", 2, 1)
    with pytest.raises(psycopg.errors.CheckViolation):
        async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
            batch = await fetch_one(
                conn, "insert into batches (blueprint) values ('[\"step_a\"]') returning id"
            )
            await conn.execute(
                "insert into batch_items (batch_id, raw_data) values (%(b)s, '{}'), (%(b)s, '{}')",
                {"b": batch["id"]},
            )
    assert await row_counts(conn) == (0, 0, 0)


async def test_the_csv_import_is_refused_whole(conn: Conn, dsn: str, tmp_path: Path) -> None:
    await set_quota(conn, "quota_items_per_batch", 2)
    path = tmp_path / "companies.csv"
    path.write_text("name,website\nAcme,acme.com\nBeta,beta.io\nGamma,gamma.co\n")
    with pytest.raises(QuotaExceeded, match="quota_items_per_batch"):
        await import_csv(dsn, path, ["step_a"])
    assert await row_counts(conn) == (0, 0, 0)

    await set_quota(conn, "quota_items_per_batch", 3)
    await set_quota(conn, "quota_item_bytes", 200)
    path.write_text(f"name,notes\nAcme,short\nBeta,{'x' * 300}\n")
    with pytest.raises(QuotaExceeded, match=r"raw_data of item 2 of this insert"):
        await import_csv(dsn, path, ["step_a"])
    assert await row_counts(conn) == (0, 0, 0)


def test_the_cli_shows_the_quota_without_a_traceback(
    dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with psycopg.connect(dsn, autocommit=True) as sync_conn:
        sync_conn.execute(
            "update enrichment_settings set value = '2' where key = 'quota_items_per_batch'"
        )
    path = tmp_path / "companies.csv"
    path.write_text("name,website\nAcme,acme.com\nBeta,beta.io\nGamma,gamma.co\n")
    monkeypatch.setenv("DATABASE_URL", dsn)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(
            main, ["batch", "create", str(path), "--steps", "step_a"], catch_exceptions=False
        )
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    assert "quota exceeded" in result.stderr and "quota_items_per_batch" in result.stderr
    assert "the limit is 2" in result.stderr
    with psycopg.connect(dsn) as sync_conn:
        row = sync_conn.execute(
            "select (select count(*) from batches), (select count(*) from batch_items)"
        ).fetchone()
    assert row == (0, 0)


async def test_the_item_checks_run_once_per_statement(conn: Conn) -> None:
    """A 1,000,000-row COPY pays one pass over its rows, not a million trigger calls: the item
    quotas are a statement-level trigger, and batch_items has no row-level trigger at all."""
    triggers = await fetch(
        conn,
        "select tgname, tgtype & 1 = 1 as per_row from pg_trigger"
        " where tgrelid = 'batch_items'::regclass and not tgisinternal order by tgname",
    )
    assert {"tgname": "batch_items_check_quotas", "per_row": False} in triggers
    assert [t["tgname"] for t in triggers if t["per_row"]] == []

    batch = await fetch_one(conn, NEW_BATCH)
    await conn.execute(
        "insert into batch_items (batch_id, raw_data)"
        " select %s, jsonb_build_object('n', g) from generate_series(1, 20000) g",
        (batch["id"],),
    )
    assert await row_counts(conn) == (1, 20000, 20000)


async def test_an_unset_or_broken_setting_falls_back_to_the_default(conn: Conn) -> None:
    await conn.execute(
        "update enrichment_settings set value = 'lots' where key = 'quota_items_per_batch'"
    )
    await conn.execute("delete from enrichment_settings where key = 'quota_item_bytes'")
    batch = await fetch_one(conn, NEW_BATCH)
    with pytest.raises(psycopg.errors.CheckViolation) as caught:
        await conn.execute(
            "insert into batch_items (batch_id, raw_data)"
            " values (%s, jsonb_build_object('x', repeat('x', 2 * 1024 * 1024)))",
            (batch["id"],),
        )
    assert caught.value.diag.constraint_name == "quota_item_bytes"
    await conn.execute(
        "insert into batch_items (batch_id, raw_data) values (%s, %s)",
        (batch["id"], Jsonb({"id": str(uuid.uuid4())})),
    )
