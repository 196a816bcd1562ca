"""The local callback receiver of ``enrich run`` and ``enrich serve``: an HTTP listener on
127.0.0.1 that applies ASYNC steps' callbacks, and the URLs the workers hand to providers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from uuid import UUID

import psycopg

from shared.callbacks.receiver import create_callback_app, serve_callbacks
from shared.callbacks.token import TOKEN_TTL as TOKEN_TTL  # bench/callbacks.py reads it here
from shared.callbacks.token import callback_urls, load_keys
from shared.errors import ConfigurationError
from shared.settings import Settings
from shared.state_api import StateAPI, TaskRef
from shared.steps import CALLBACK_PARSERS

HAS_ASYNC_STEP = """
select exists (
  select 1 from public.batches b
  cross join lateral jsonb_array_elements_text(b.blueprint) s(step_name)
  join public.enrichment_registry r on r.step_name = s.step_name
  where b.id = %(batch_id)s and r.type = 'ASYNC')
"""


async def blueprint_has_async_step(dsn: str, batch_id: UUID) -> bool:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(HAS_ASYNC_STEP, {"batch_id": batch_id})
        row = await cur.fetchone()
        return bool(row and row[0])


@contextlib.asynccontextmanager
async def callback_receiver(
    api: StateAPI, settings: Settings, port: int
) -> AsyncIterator[Callable[[TaskRef], str]]:
    """Run the receiver on 127.0.0.1:``port`` (0: any free port) while the block runs; yields
    the function that makes an attempt's callback URL."""
    keys = load_keys(settings)
    app = create_callback_app(api, keys, parsers=CALLBACK_PARSERS)
    try:
        server = await serve_callbacks(app, "127.0.0.1", port)
    except OSError as exc:
        raise ConfigurationError(
            f"{exc.strerror or exc}: is another enrich running? choose another --callback-port"
        ) from exc
    try:
        yield callback_urls(settings.callback_base_url or server.url, keys)
    finally:
        await server.stop()
