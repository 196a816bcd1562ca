"""Open the State API for this process's configuration."""

from __future__ import annotations

from shared.db.connect import resolve_dsn
from shared.pg_state import PgStateAPI
from shared.settings import Settings, get_settings
from shared.state_api import StateAPI


async def open_state_api(settings: Settings | None = None, *, max_size: int = 8) -> StateAPI:
    """PostgreSQL at ``DATABASE_URL``, or the embedded default when it is unset."""
    cfg = settings or get_settings()
    return await PgStateAPI.open(await resolve_dsn(cfg), max_size=max_size)
