"""Resolve the database to use: ``DATABASE_URL`` when set, else the private cluster (migrated).

This is what lets every command work with no configuration at all.
"""

from __future__ import annotations

import asyncio
import re

import psycopg

from shared.db.embedded import EmbeddedPostgres
from shared.db.migrate import migrate
from shared.errors import DatabaseUnavailable
from shared.settings import DATABASE_URL_HINT, Settings, get_settings, mask_dsn

# The first connection to DATABASE_URL is one attempt, bounded: libpq's connect_timeout (whole
# seconds, at least 2) covers one address, and psycopg tries each address a host name resolves
# to in turn, each with its own timeout (psycopg/connection_async.py, AsyncConnection.connect,
# conninfo_attempts_async), so the whole attempt has a deadline of its own too.
CONNECT_TIMEOUT_S = 3
PROBE_DEADLINE_S = 4.0

# The DATABASE_URLs this process reached once: a long-lived caller (the local worker service
# resolves per spawn, a served conductor per flow run) pays the probe's connection only the first
# time; a later outage is its pool's to ride out, as before the probe existed.
_reached: set[str] = set()

# The private clusters ``resolve_dsn`` started in this process (the CLI says at the end of a
# command that one it started is still running).
_started: list[EmbeddedPostgres] = []


def take_started_clusters() -> list[EmbeddedPostgres]:
    """The private clusters started since the last call (and forget them)."""
    taken = list(_started)
    _started.clear()
    return taken


async def resolve_dsn(settings: Settings | None = None) -> str:
    """The DSN to connect to.

    With ``DATABASE_URL`` set it is returned as it is (an external database is migrated explicitly,
    by ``enrich db up`` or the deploy script). Otherwise the private cluster is started if needed
    and brought up to date with the migrations and the seed.
    """
    cfg = settings or get_settings()
    external = cfg.database_dsn
    if external is not None:
        if external not in _reached:
            await check_reachable(external)
            _reached.add(external)
        return external
    cluster = EmbeddedPostgres(settings=cfg)
    dsn = await asyncio.to_thread(cluster.start)
    if cluster.started:
        _started.append(cluster)
    await migrate(dsn)
    return dsn


async def check_reachable(dsn: str) -> None:
    """Connect once to ``dsn`` (DATABASE_URL) within ``PROBE_DEADLINE_S``, or raise one
    ``DatabaseUnavailable`` naming DATABASE_URL (password masked), libpq's reason and what a valid
    one looks like.

    Done before any pool opens: psycopg_pool retries a failing connection for its whole open
    timeout (30 s), logging the same error at each try.
    """
    try:
        async with asyncio.timeout(PROBE_DEADLINE_S):
            conn = await psycopg.AsyncConnection.connect(
                dsn, connect_timeout=CONNECT_TIMEOUT_S, autocommit=True
            )
    except TimeoutError:
        reason = f"no answer within {PROBE_DEADLINE_S:g} s"
    except psycopg.Error as exc:
        reason = _one_line(exc, dsn)
    else:
        await conn.close()
        return
    raise DatabaseUnavailable(
        f"cannot connect to DATABASE_URL={mask_dsn(dsn)}: {reason}; check its host, port, user "
        f"and password: {DATABASE_URL_HINT}"
    )


def _one_line(exc: psycopg.Error, dsn: str) -> str:
    """libpq's message on one line, without the password should it ever quote it."""
    # "...failed: Connection refused\n\tIs the server running...": a sentence per line.
    text = re.sub(r"(?<=[\w)])[ \t]*\n\s*", ". ", str(exc).strip())
    text = " ".join(text.split()).removeprefix("connection failed: ")
    try:
        password = psycopg.conninfo.conninfo_to_dict(dsn).get("password")
    except psycopg.Error:
        password = None
    return text.replace(str(password), "***") if password else text


def resolve_dsn_sync(settings: Settings | None = None) -> str:
    """``resolve_dsn()`` for callers without an event loop."""
    return asyncio.run(resolve_dsn(settings))
