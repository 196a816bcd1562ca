"""A local stand-in for an ASYNC provider: accepts an item, answers later on its callback URL.

``step_async`` sends its items here. Like a real provider (a Clay table's HTTP API column, an Exa
Webset, a bulk job), the emulator answers over real HTTP, later, with a JSON body, and it can
misbehave on purpose, deterministically per item (``item_id.int % n == 0`` selects about 1/n):

``delay_ms`` (default 50)        how long before it calls back
``fail_every`` n                 answers {"error": ..., "retryable": true} instead of a result
``drop_every`` n                 never calls back (the row's callback deadline retries it)
``duplicate_every`` n            calls back twice with the same body
``fault_attempts`` k             the faults above hit attempts 1..k only (default: every attempt)

It lives in the worker's process (the local pool keeps its event loop running until the batch is
done), so it needs no server of its own. A callback that cannot be delivered is retried a few
times with backoff, as providers do.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Mapping
from typing import Any

import httpx

from shared.errors import ConfigurationError

log = logging.getLogger(__name__)

DELIVERY_ATTEMPTS = 5
CONNECTIONS = 16


class Emulator:
    """Pending callbacks of this process; ``submit`` returns at once with a request id."""

    def __init__(self) -> None:
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Deliveries in flight. More would only queue inside httpcore's pool, whose bookkeeping is
        # quadratic in its queue (bench/callbacks.py: 45 callbacks/s with 2,000 queued).
        self._sending: asyncio.Semaphore | None = None

    def submit(
        self,
        callback_url: str,
        item: Mapping[str, Any],
        *,
        item_id: uuid.UUID,
        attempt: int,
        config: Mapping[str, Any],
    ) -> str:
        request_id = f"emu-{uuid.uuid4().hex[:12]}"
        plan = _plan(config, item_id, attempt)
        if plan.copies:
            body = _body(item, request_id, plan.fail)
            task = asyncio.create_task(self._deliver(callback_url, body, plan.delay, plan.copies))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return request_id

    async def _deliver(self, url: str, body: dict[str, Any], delay: float, copies: int) -> None:
        await asyncio.sleep(delay)
        if self._sending is None:
            self._sending = asyncio.Semaphore(CONNECTIONS)
        async with self._sending:
            for _ in range(copies):
                await self._post(url, body)

    async def _post(self, url: str, body: dict[str, Any]) -> None:
        if self._client is None:
            # A few kept-alive connections, as a provider's webhook sender has: hundreds of new
            # connections at once overflow a busy receiver's accept queue.
            self._client = httpx.AsyncClient(
                timeout=10.0,
                limits=httpx.Limits(
                    max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS
                ),
            )
        wait = 0.2
        for attempt in range(1, DELIVERY_ATTEMPTS + 1):
            try:
                response = await self._client.post(url, json=body)
            except httpx.HTTPError as exc:
                log.debug("emulator: callback not delivered (%s), attempt %d", exc, attempt)
            else:
                if response.status_code < 500:
                    return  # 2xx applied, 4xx refused: either way the provider is done
            await asyncio.sleep(wait)
            wait *= 2
        log.warning("emulator: gave up delivering a callback after %d attempts", DELIVERY_ATTEMPTS)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class _Plan:
    def __init__(self, delay: float, copies: int, fail: bool) -> None:
        self.delay, self.copies, self.fail = delay, copies, fail


def _every(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"config.{key} must be an integer >= 1, got {value!r}")
    return value


def _plan(config: Mapping[str, Any], item_id: uuid.UUID, attempt: int) -> _Plan:
    delay_ms = config.get("delay_ms", 50)
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, int | float) or delay_ms < 0:
        raise ConfigurationError(f"config.delay_ms must be a number >= 0, got {delay_ms!r}")
    fault_attempts = config.get("fault_attempts")
    faulty = fault_attempts is None or attempt <= int(fault_attempts)

    def hit(key: str) -> bool:
        every = _every(config, key)
        return faulty and every is not None and item_id.int % every == 0

    copies = 0 if hit("drop_every") else 2 if hit("duplicate_every") else 1
    return _Plan(float(delay_ms) / 1000, copies, hit("fail_every"))


def _body(item: Mapping[str, Any], request_id: str, fail: bool) -> dict[str, Any]:
    if fail:
        return {"request_id": request_id, "error": "emulated provider failure", "retryable": True}
    return {"request_id": request_id, "provider": "emulator", "name": item.get("name")}


# One per process: the local pool's handlers share it.
EMULATOR = Emulator()
