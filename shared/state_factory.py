"""Open the State API for this process's configuration."""

from __future__ import annotations

import logging

from shared.db.connect import resolve_dsn
from shared.extras import require_cloud
from shared.pg_state import PgStateAPI
from shared.settings import Settings, get_settings
from shared.state_api import StateAPI

log = logging.getLogger(__name__)


async def open_state_api(settings: Settings | None = None, *, max_size: int = 8) -> StateAPI:
    """Supabase's REST endpoint when ``SUPABASE_URL`` and ``SUPABASE_SERVICE_ROLE_KEY`` are both
    set (the Modal workers), else PostgreSQL at ``DATABASE_URL``, or the embedded default when that
    is unset too."""
    cfg = settings or get_settings()
    url, key = cfg.supabase_url, cfg.supabase_service_role_key
    if url and key is not None and key.get_secret_value():
        # Imported here: supabase-py is heavy, only the Supabase path needs it, and it comes with
        # the cloud extra, which the local install leaves out.
        require_cloud("the Supabase State API (SUPABASE_URL)", "supabase", "postgrest")
        from shared.supabase_state import SupabaseStateAPI

        return await SupabaseStateAPI.open(url, key, max_connections=max_size)
    if url or key is not None:
        missing = "SUPABASE_SERVICE_ROLE_KEY" if url else "SUPABASE_URL"
        log.warning("%s is not set: using PostgreSQL, not Supabase's REST endpoint", missing)
    return await PgStateAPI.open(await resolve_dsn(cfg), max_size=max_size)
