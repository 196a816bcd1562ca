"""Test fixtures: one PostgreSQL server per session, one migrated template, one database per test.

The server is ``TEST_DATABASE_URL`` (a superuser DSN) when set, else a private cluster started with
``EmbeddedPostgres`` in a short temporary directory (unix socket paths are limited to 107 bytes, and
as root the directory must be traversable by the ``postgres`` OS user, which pytest's own
``/tmp/pytest-of-root`` is not). The template ``enrich_template`` is migrated once per session;
each test gets ``CREATE DATABASE t_<hex> TEMPLATE enrich_template``, dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from shared.db.embedded import EmbeddedPostgres
from shared.db.migrate import migrate
from shared.pg_state import PgStateAPI
from shared.settings import Settings, get_settings

TEMPLATE_DB = "enrich_template"

# Tests never touch the application's own database: a stray DATABASE_URL or Supabase project
# (say, production) is dropped for the whole session. Use TEST_DATABASE_URL to test against a
# server; Supabase is emulated (tests/postgrest_emulator.py).
for _variable in ("DATABASE_URL", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"):
    os.environ.pop(_variable, None)
get_settings.cache_clear()


def wait_for(
    predicate: Callable[[], bool], *, timeout: float = 10.0, interval: float = 0.02
) -> None:
    """Poll ``predicate`` until it is true; fail the test when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def make_short_home(prefix: str = "enr") -> Path:
    """A fresh directory under /tmp, short enough for the socket path and traversable by the
    ``postgres`` OS user (when the tests run as root)."""
    home = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    home.chmod(0o755)
    return home


def remove_home(home: Path) -> None:
    """Stop a cluster left running under ``home`` (if any) and delete the directory."""
    cluster = EmbeddedPostgres(home=home, settings=Settings(enrich_home=home))
    try:
        if cluster.status().running:
            cluster.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


@dataclass(frozen=True)
class PgServer:
    """A PostgreSQL server the tests may create and drop databases on."""

    admin_dsn: str  # a superuser DSN (any database)
    cluster: EmbeddedPostgres | None  # None when TEST_DATABASE_URL is used

    def dsn_for(self, dbname: str) -> str:
        return make_conninfo(self.admin_dsn, dbname=dbname)

    def create_database(self, dbname: str, template: str = "template0") -> str:
        with psycopg.connect(self.dsn_for("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("create database {} template {}").format(
                    sql.Identifier(dbname), sql.Identifier(template)
                )
            )
        return self.dsn_for(dbname)

    def drop_database(self, dbname: str) -> None:
        with psycopg.connect(self.dsn_for("postgres"), autocommit=True) as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(dbname))
            )


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield PgServer(admin_dsn=external, cluster=None)
        return
    home = make_short_home()
    previous_home = os.environ.get("ENRICH_HOME")
    # Code under test that resolves the database itself finds this same cluster.
    os.environ["ENRICH_HOME"] = str(home)
    get_settings.cache_clear()
    cluster = EmbeddedPostgres(home=home, settings=Settings(enrich_home=home))
    try:
        dsn = cluster.start()
        yield PgServer(admin_dsn=dsn, cluster=cluster)
    finally:
        try:
            cluster.stop()
        finally:
            shutil.rmtree(home, ignore_errors=True)
            if previous_home is None:
                os.environ.pop("ENRICH_HOME", None)
            else:
                os.environ["ENRICH_HOME"] = previous_home
            get_settings.cache_clear()


@pytest.fixture(scope="session")
def template_db(pg_server: PgServer) -> str:
    """The name of a database with every migration and the seed applied (once per session)."""
    pg_server.drop_database(TEMPLATE_DB)
    dsn = pg_server.create_database(TEMPLATE_DB)
    asyncio.run(migrate(dsn))
    return TEMPLATE_DB


@pytest.fixture
def dsn(pg_server: PgServer, template_db: str) -> Iterator[str]:
    """A fresh, fully migrated database for this test (a copy of the template)."""
    name = f"t_{uuid.uuid4().hex}"
    url = pg_server.create_database(name, template=template_db)
    try:
        yield url
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def db(dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point the CLI (``DATABASE_URL``, settings re-read) at this test's database."""
    monkeypatch.setenv("DATABASE_URL", dsn)
    get_settings.cache_clear()
    yield dsn
    get_settings.cache_clear()


@pytest.fixture
def empty_dsn(pg_server: PgServer) -> Iterator[str]:
    """A fresh database with nothing in it (no migrations)."""
    name = f"e_{uuid.uuid4().hex}"
    url = pg_server.create_database(name)
    try:
        yield url
    finally:
        pg_server.drop_database(name)


@pytest.fixture
async def conn(dsn: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    """An autocommit async connection to this test's database."""
    aconn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        yield aconn
    finally:
        await aconn.close()


@pytest.fixture
async def api(dsn: str) -> AsyncIterator[PgStateAPI]:
    """The State API on this test's database (modules may define their own ``api``)."""
    state_api = await PgStateAPI.open(dsn)
    try:
        yield state_api
    finally:
        await state_api.close()


@pytest.fixture
def short_home() -> Iterator[Path]:
    """A private, short ENRICH_HOME for a test's own cluster; stopped and removed afterwards."""
    home = make_short_home()
    try:
        yield home
    finally:
        remove_home(home)
