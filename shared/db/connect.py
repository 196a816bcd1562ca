"""Resolve the database to use: ``DATABASE_URL`` when set, else the private cluster (migrated).

This is what lets every command work with no configuration at all.
"""

from __future__ import annotations

import asyncio

from shared.db.embedded import EmbeddedPostgres
from shared.db.migrate import migrate
from shared.settings import Settings, get_settings

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
        return external
    cluster = EmbeddedPostgres(settings=cfg)
    dsn = await asyncio.to_thread(cluster.start)
    if cluster.started:
        _started.append(cluster)
    await migrate(dsn)
    return dsn


def resolve_dsn_sync(settings: Settings | None = None) -> str:
    """``resolve_dsn()`` for callers without an event loop."""
    return asyncio.run(resolve_dsn(settings))
