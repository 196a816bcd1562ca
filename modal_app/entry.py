"""What every Modal function runs: open the State API, run the chunk, close. No Modal imports here,
so tests call it directly with a real database."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from typing import Any

from shared.callbacks.token import callback_urls, configured_keys, load_keys
from shared.observability import init_observability
from shared.settings import get_settings
from shared.state_api import TaskRef
from shared.state_factory import open_state_api
from shared.worker import run_chunk


async def run_function_chunk(
    function_name: str,
    tasks: Sequence[Mapping[str, Any]],
    *,
    callback_base_url: str | None = None,
    key_from_environment: bool = False,
) -> dict[str, Any]:
    """Start, run and complete or fail ``tasks`` with the step handler ``function_name``.

    ``callback_base_url``: where the callback receiver listens, for ASYNC steps (their providers
    answer on ``<base>/callbacks/<token>``); ``ENRICH_CALLBACK_BASE_URL`` overrides it.
    ``key_from_environment``: sign with ``ENRICH_CALLBACK_SECRET`` only, never a key file (on
    Modal the receiver runs in another container; under ``enrich dev up`` both processes share
    ENRICH_HOME's key file).
    """
    init_observability("worker", function=function_name)
    refs = [TaskRef.from_json(t) for t in tasks]
    callback_url = _callback_urls(callback_base_url, key_from_environment)
    api = await open_state_api()
    try:
        report = await run_chunk(api, function_name, refs, callback_url=callback_url)
    finally:
        await api.close()
    return asdict(report)


def _callback_urls(
    base_url: str | None, key_from_environment: bool
) -> Callable[[TaskRef], str] | None:
    settings = get_settings()
    base = settings.callback_base_url or base_url
    if base is None:
        return None
    keys = configured_keys(settings) if key_from_environment else load_keys(settings)
    return callback_urls(base, keys)
