"""The conductor as a Prefect flow: one pass of ``shared.conductor.conduct``, then exit.

Deployed with an event trigger (a state change in the database) and a one-minute schedule (the
safety sweep). It holds no state between runs and never sees business data: ids, step names,
attempts and function names only. Overlapping runs are safe: claims skip locked rows.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import asdict
from typing import Any, cast
from uuid import UUID

from prefect import flow, get_run_logger

from flows.dispatchers import (
    LOCAL_WORKERS_URL_ENV,
    ModalDispatcher,
    local_function_lookup,
    modal_function_lookup,
)
from flows.progress_artifacts import PUBLISH_EVERY_SECONDS, BatchArtifacts, WatchingDispatcher
from shared.conductor import Dispatcher, conduct_until_idle
from shared.errors import ConfigurationError
from shared.observability import init_observability
from shared.settings import get_settings
from shared.state_api import StateAPI
from shared.state_factory import open_state_api

SECRET_BLOCK_ENV = "ENRICH_SERVICE_ROLE_SECRET_BLOCK"


async def load_service_role_key() -> None:
    """Read the Supabase service-role key from the Prefect Secret block named by
    ``ENRICH_SERVICE_ROLE_SECRET_BLOCK`` (deploy.sh saves it), so the key is never stored in the
    deployment's job variables, where anyone who can read the deployment would see it."""
    block = os.environ.get(SECRET_BLOCK_ENV)
    if not block or os.environ.get("SUPABASE_SERVICE_ROLE_KEY"):
        return
    from prefect.blocks.system import Secret

    # aload is typed as returning an unresolved type variable; it returns the block.
    secret = cast("Secret[Any]", await Secret.aload(block))
    os.environ["SUPABASE_SERVICE_ROLE_KEY"] = str(secret.get())
    get_settings.cache_clear()


def make_dispatcher(kind: str, api: StateAPI) -> Dispatcher:
    """``modal``: the deployed Modal app. ``local``: the stand-in for Modal that ``enrich dev up``
    starts (``modal_app.local_service``), at the URL in ``ENRICH_LOCAL_WORKERS_URL``."""
    if kind == "modal":
        settings = get_settings()
        lookup = modal_function_lookup(settings.modal_app_name, settings.modal_environment)
        return ModalDispatcher(api, lookup)
    if kind == "local":
        url = os.environ.get(LOCAL_WORKERS_URL_ENV)
        if not url:
            raise ConfigurationError(
                f"dispatcher 'local' needs {LOCAL_WORKERS_URL_ENV}, the URL of the local worker "
                "service (enrich dev up sets it)"
            )
        return ModalDispatcher(api, local_function_lookup(url))
    raise ValueError(f"unknown dispatcher {kind!r}; expected 'modal' or 'local'")


@flow(name="enrichment-conductor", retries=0, timeout_seconds=600, validate_parameters=True)
async def conductor(
    batch_ids: list[str] | None = None,
    dispatcher: str = "modal",
    claim_limit: int = 1000,
    max_rows: int = 50_000,
    linger_seconds: float = 10.0,
    progress_every_seconds: float = PUBLISH_EVERY_SECONDS,
) -> dict[str, Any]:
    """Sweep expired leases, claim every ready row (up to ``max_rows``), dispatch; keep claiming
    while rows keep becoming ready, and exit after ``linger_seconds`` with nothing to claim.

    Meanwhile, every ``progress_every_seconds`` (0: never), it publishes progress artifacts for
    each batch it claimed rows of or was given (``flows.progress_artifacts``), and at the end."""
    init_observability("conductor", dispatcher=dispatcher)
    logger = get_run_logger()
    await load_service_role_key()
    api = await open_state_api()
    batches = [UUID(b) for b in batch_ids] if batch_ids else None
    artifacts = BatchArtifacts(api, every_seconds=progress_every_seconds)
    artifacts.watch(batches or [])
    publishing = (
        asyncio.create_task(artifacts.keep_publishing()) if progress_every_seconds > 0 else None
    )
    try:
        report = await conduct_until_idle(
            api,
            WatchingDispatcher(make_dispatcher(dispatcher, api), artifacts.watch),
            linger_seconds=linger_seconds,
            claim_limit=claim_limit,
            max_rows=max_rows,
            batch_ids=batches,
        )
    finally:
        if publishing is not None:
            publishing.cancel()
            # Waits for it to stop without re-raising its cancellation (a cancellation of this
            # run still propagates).
            await asyncio.wait([publishing])
            await artifacts.publish_final()
        await api.close()
    logger.info(
        "conductor pass: swept %d, claimed %d, dispatched %d, dispatch failures %d",
        report.swept,
        report.claimed,
        report.dispatched,
        report.dispatch_failures,
    )
    return asdict(report)
