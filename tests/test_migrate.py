"""The migration runner, on scratch migration directories and on the project's own migrations."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg
import pytest

from shared.db.migrate import (
    MigrationError,
    default_migrations_dir,
    discover,
    migrate,
    status,
)
from shared.errors import InvalidInput

SEED = """
insert into public.things (name) values ('seeded') on conflict (name) do nothing;
"""


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text)
    return path


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """A scratch ``supabase``-like dir: migrations/ with two files, and seed.sql beside it."""
    mdir = tmp_path / "migrations"
    mdir.mkdir()
    _write(
        mdir,
        "20240101000000_things.sql",
        # Several statements, a dollar-quoted body and a literal % in one file.
        "create table public.things (id serial primary key, name text unique not null);\n"
        "create function public.pct() returns text language sql as $$ select '100%' $$;\n",
    )
    _write(mdir, "20240102000000_more.sql", "alter table public.things add column n int;\n")
    _write(mdir, "README.md", "not a migration")
    _write(mdir, "notes.sql", "this is not named <version>_<name>.sql and is skipped")
    _write(tmp_path, "seed.sql", SEED)
    return mdir


async def _scalar(dsn: str, query: str) -> object:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        row = await (await conn.execute(query.encode())).fetchone()
    assert row is not None
    return row[0]


def test_discover_orders_and_skips(scratch: Path) -> None:
    found = discover(scratch)
    assert [(m.version, m.name) for m in found] == [
        ("20240101000000", "things"),
        ("20240102000000", "more"),
    ]


def test_discover_rejects_duplicate_versions(scratch: Path) -> None:
    _write(scratch, "20240101000000_again.sql", "select 1;")
    with pytest.raises(InvalidInput, match="share version 20240101000000"):
        discover(scratch)


def test_discover_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="does not exist"):
        discover(tmp_path / "nope")


async def test_applies_once_then_nothing(empty_dsn: str, scratch: Path) -> None:
    before = await status(empty_dsn, scratch)
    assert before.applied == []
    assert [m.version for m in before.pending] == ["20240101000000", "20240102000000"]

    assert await migrate(empty_dsn, scratch) == ["20240101000000", "20240102000000"]
    assert await migrate(empty_dsn, scratch) == []

    assert await _scalar(empty_dsn, "select public.pct()") == "100%"
    # The seed ran on both runs and stayed idempotent.
    assert await _scalar(empty_dsn, "select count(*) from public.things") == 1
    async with await psycopg.AsyncConnection.connect(empty_dsn) as conn:
        rows = await (
            await conn.execute(
                "select version, name, statements from supabase_migrations.schema_migrations"
                " order by version"
            )
        ).fetchall()
    assert [(r[0], r[1]) for r in rows] == [
        ("20240101000000", "things"),
        ("20240102000000", "more"),
    ]
    assert "alter table public.things" in rows[1][2][0]

    after = await status(empty_dsn, scratch)
    assert after.applied == ["20240101000000", "20240102000000"]
    assert after.pending == [] and after.unknown == []


async def test_new_file_applies_alone_and_unknown_reported(empty_dsn: str, scratch: Path) -> None:
    await migrate(empty_dsn, scratch)
    _write(scratch, "20240103000000_third.sql", "alter table public.things add column m int;")
    assert [m.version for m in (await status(empty_dsn, scratch)).pending] == ["20240103000000"]
    assert await migrate(empty_dsn, scratch) == ["20240103000000"]

    (scratch / "20240103000000_third.sql").unlink()
    assert (await status(empty_dsn, scratch)).unknown == ["20240103000000"]


async def test_failed_migration_rolls_back(empty_dsn: str, scratch: Path) -> None:
    _write(
        scratch,
        "20240103000000_broken.sql",
        "create table public.half (x int);\nselect no_such_function();\n",
    )
    with pytest.raises(MigrationError, match=r"20240103000000_broken\.sql"):
        await migrate(empty_dsn, scratch)
    # The files before it stay applied; the broken one left nothing behind and is not recorded.
    report = await status(empty_dsn, scratch)
    assert report.applied == ["20240101000000", "20240102000000"]
    assert [m.version for m in report.pending] == ["20240103000000"]
    assert await _scalar(empty_dsn, "select to_regclass('public.half') is null") is True

    _write(scratch, "20240103000000_broken.sql", "create table public.half (x int);\n")
    assert await migrate(empty_dsn, scratch) == ["20240103000000"]


async def test_failed_seed_raises(empty_dsn: str, scratch: Path) -> None:
    (scratch.parent / "seed.sql").write_text("insert into public.nope values (1);")
    with pytest.raises(MigrationError, match="seed"):
        await migrate(empty_dsn, scratch)
    # run_seed=False skips it.
    assert await migrate(empty_dsn, scratch, run_seed=False) == []


async def test_concurrent_runners_apply_each_file_once(empty_dsn: str, scratch: Path) -> None:
    results = await asyncio.gather(*(migrate(empty_dsn, scratch) for _ in range(4)))
    applied = sorted(v for r in results for v in r)
    assert applied == ["20240101000000", "20240102000000"]


async def test_replay_project_migrations_on_empty_database(empty_dsn: str) -> None:
    """Every migration of the project, replayed from scratch, gives the expected schema."""
    expected = [m.version for m in discover(default_migrations_dir())]
    assert expected, "the project has no migrations"
    assert await migrate(empty_dsn) == expected
    assert await migrate(empty_dsn) == []

    async with await psycopg.AsyncConnection.connect(empty_dsn) as conn:
        tables = {
            r[0]
            for r in await (
                await conn.execute(
                    "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
                    " where n.nspname = 'public' and c.relkind in ('r', 'p')"
                )
            ).fetchall()
        }
        no_rls = [
            r[0]
            for r in await (
                await conn.execute(
                    "select c.relname from pg_class c join pg_namespace n on n.oid = c.relnamespace"
                    " where n.nspname = 'public' and c.relkind in ('r', 'p')"
                    " and not c.relrowsecurity"
                )
            ).fetchall()
        ]
        steps = {
            r[0]
            for r in await (
                await conn.execute("select step_name from public.enrichment_registry")
            ).fetchall()
        }
    assert {"batches", "batch_items", "workflow_states", "enrichment_registry"} <= tables
    assert no_rls == [], f"tables without row level security: {no_rls}"
    assert {"step_a", "step_b", "normalize_domain", "clean_company_name"} <= steps


async def test_template_copy_is_fully_migrated(
    conn: psycopg.AsyncConnection[tuple[object, ...]],
) -> None:
    """The per-test database (a copy of the session template) has every migration and the seed."""
    rows = await (
        await conn.execute("select version from supabase_migrations.schema_migrations")
    ).fetchall()
    expected = [m.version for m in discover(default_migrations_dir())]
    assert sorted(str(r[0]) for r in rows) == expected
    row = await (await conn.execute("select count(*) from public.enrichment_registry")).fetchone()
    assert row is not None and isinstance(row[0], int) and row[0] >= 4
