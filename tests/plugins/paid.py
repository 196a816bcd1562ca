"""A paid step for tests: one HTTP call per item to ``config.url`` (tests answer it with respx).

``paid_call`` POSTs ``{"item_id": ...}``. On a 2xx answer the call is billed: it charges
``Cost(config.provider, 1, config.cost_usd)`` at once (before the result is trusted) and returns
the answer's JSON. A 429 raises ``RateLimited`` with the answer's Retry-After (seconds), 5xx and
network errors ``RetryableError``, any other status ``TerminalError``. A 429 is not billed (as
Exa and most providers do).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from typing import Any

import httpx

from shared.errors import RateLimited, RetryableError, TerminalError
from shared.state_api import Cost
from shared.steps.base import StepContext, StepHandler


def retry_after_seconds(response: httpx.Response) -> float | None:
    """Retry-After in seconds (the delta-seconds form; an HTTP date is left to the backoff)."""
    value = response.headers.get("retry-after")
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


# One client per event loop, as a real provider client keeps one: creating a client builds an SSL
# context (tens of ms of CPU), which would cap the calls a test can make per second.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def _client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None:
        client = _clients[loop] = httpx.AsyncClient(timeout=10)
    return client


async def paid_call(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
    provider = str(ctx.config["provider"])
    try:
        response = await _client().post(str(ctx.config["url"]), json={"item_id": str(ctx.item_id)})
    except httpx.HTTPError as exc:
        raise RetryableError(f"{provider}: {type(exc).__name__}: {exc}") from exc
    if response.status_code == 429:
        raise RateLimited(
            f"{provider} answered 429", provider=provider, retry_after=retry_after_seconds(response)
        )
    if response.status_code >= 500:
        raise RetryableError(f"{provider} answered {response.status_code}")
    if response.status_code >= 300:
        raise TerminalError(f"{provider} answered {response.status_code}")
    ctx.charge(Cost(provider, 1, float(ctx.config.get("cost_usd", 0))))
    answer: dict[str, Any] = response.json()
    return answer


HANDLERS: dict[str, StepHandler] = {"paid_call": paid_call}
