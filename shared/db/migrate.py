"""The migration runner: ``supabase/migrations/<version>_<name>.sql`` in order, then seed.sql.

Each pending file runs in its own transaction, all under one session advisory lock (so concurrent
runners apply every file exactly once), and is recorded in
``supabase_migrations.schema_migrations``, the table the Supabase CLI uses: a database migrated here
is recognised by ``supabase db push`` and vice versa. ``seed.sql`` runs after every migration run;
it is idempotent.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

import shared
from shared.errors import DatabaseUnavailable, InvalidInput, TerminalError

# Any constant shared by every runner; "enrich.migrate" in ASCII-ish digits.
ADVISORY_LOCK_KEY = 0x656E7269636D6967
MIGRATION_FILE = re.compile(r"^(?P<version>\d+)_(?P<name>.+)\.sql$")

CREATE_HISTORY = """
create schema if not exists supabase_migrations;
create table if not exists supabase_migrations.schema_migrations (
    version text not null primary key,
    statements text[],
    name text
);
"""


class MigrationError(TerminalError):
    """A migration or the seed failed; its transaction was rolled back."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path


@dataclass(frozen=True)
class MigrationStatus:
    applied: list[str]
    pending: list[Migration]
    unknown: list[str] = field(default_factory=list)
    """Versions recorded in the database that have no file here."""


def sql_root() -> Path:
    """The ``supabase`` directory: at the repo root, or ``shared/_supabase`` in a wheel install."""
    package_dir = Path(shared.__file__).resolve().parent
    for candidate in (package_dir.parent / "supabase", package_dir / "_supabase"):
        if (candidate / "migrations").is_dir():
            return candidate
    raise InvalidInput(
        f"no migrations found: neither {package_dir.parent / 'supabase'} nor "
        f"{package_dir / '_supabase'} holds a migrations directory"
    )


def default_migrations_dir() -> Path:
    return sql_root() / "migrations"


def discover(migrations_dir: Path) -> list[Migration]:
    """The migration files of ``migrations_dir``, in the order the Supabase CLI applies them."""
    if not migrations_dir.is_dir():
        raise InvalidInput(f"migrations directory {migrations_dir} does not exist")
    found: list[Migration] = []
    seen: dict[str, Path] = {}
    for path in sorted(migrations_dir.glob("*.sql"), key=lambda p: p.name):
        m = MIGRATION_FILE.match(path.name)
        if m is None:
            continue  # like the Supabase CLI: files not named <version>_<name>.sql are skipped
        version = m["version"]
        if version in seen:
            raise InvalidInput(f"two migrations share version {version}: {seen[version]}, {path}")
        seen[version] = path
        found.append(Migration(version=version, name=m["name"], path=path))
    return found


def _seed_for(migrations_dir: Path, seed_path: Path | None) -> Path | None:
    if seed_path is not None:
        return seed_path
    candidate = migrations_dir.parent / "seed.sql"
    return candidate if candidate.is_file() else None


async def _connect(dsn: str) -> psycopg.AsyncConnection[tuple[object, ...]]:
    try:
        return await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"cannot connect to the database: {exc}") from exc


async def _applied(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[str]:
    exists = await (
        await conn.execute("select to_regclass('supabase_migrations.schema_migrations')")
    ).fetchone()
    if exists is None or exists[0] is None:
        return []
    rows = await (
        await conn.execute("select version from supabase_migrations.schema_migrations")
    ).fetchall()
    return sorted(str(r[0]) for r in rows)


async def migrate(
    dsn: str,
    migrations_dir: Path | None = None,
    *,
    seed_path: Path | None = None,
    run_seed: bool = True,
) -> list[str]:
    """Apply the pending migrations of ``migrations_dir`` (default: the project's) and the seed.

    ``seed_path`` defaults to ``seed.sql`` beside ``migrations_dir`` when there is one. Returns the
    versions applied by this call (empty when the database was up to date).
    """
    mdir = migrations_dir if migrations_dir is not None else default_migrations_dir()
    migrations = discover(mdir)
    seed = _seed_for(mdir, seed_path) if run_seed else None
    applied_now: list[str] = []
    conn = await _connect(dsn)
    try:
        await conn.execute("select pg_advisory_lock(%s)", (ADVISORY_LOCK_KEY,))
        try:
            await conn.execute(CREATE_HISTORY)
            done = set(await _applied(conn))
            for mig in migrations:
                if mig.version in done:
                    continue
                text = mig.path.read_text(encoding="utf-8")
                try:
                    async with conn.transaction():
                        await conn.execute(text.encode())
                        await conn.execute(
                            "insert into supabase_migrations.schema_migrations"
                            " (version, statements, name) values (%s, %s, %s)",
                            (mig.version, [text], mig.name),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(f"migration {mig.path.name} failed: {exc}") from exc
                applied_now.append(mig.version)
            if seed is not None:
                try:
                    async with conn.transaction():
                        await conn.execute(seed.read_text(encoding="utf-8").encode())
                except psycopg.Error as exc:
                    raise MigrationError(f"seed {seed} failed: {exc}") from exc
        finally:
            if not conn.closed and not conn.broken:
                await conn.execute("select pg_advisory_unlock(%s)", (ADVISORY_LOCK_KEY,))
    finally:
        await conn.close()
    return applied_now


async def status(dsn: str, migrations_dir: Path | None = None) -> MigrationStatus:
    """Which migrations the database has, which are pending, and which it has that we lack."""
    mdir = migrations_dir if migrations_dir is not None else default_migrations_dir()
    migrations = discover(mdir)
    conn = await _connect(dsn)
    try:
        applied = await _applied(conn)
    finally:
        await conn.close()
    done = set(applied)
    local = {m.version for m in migrations}
    return MigrationStatus(
        applied=applied,
        pending=[m for m in migrations if m.version not in done],
        unknown=[v for v in applied if v not in local],
    )


def migrate_sync(
    dsn: str,
    migrations_dir: Path | None = None,
    *,
    seed_path: Path | None = None,
    run_seed: bool = True,
) -> list[str]:
    """``migrate()`` for callers without an event loop (the CLI)."""
    return asyncio.run(migrate(dsn, migrations_dir, seed_path=seed_path, run_seed=run_seed))
