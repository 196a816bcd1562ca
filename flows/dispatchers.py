"""Dispatchers for the conductor flow. Modal lives here, at the edge, never in ``shared``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast
from urllib.parse import quote

import httpx

from shared.errors import ConfigurationError, DispatchError
from shared.state_api import ClaimedTask, StateAPI


class SpawnCall(Protocol):
    object_id: str


class SpawnMethod(Protocol):
    async def aio(self, *args: Any, **kwargs: Any) -> SpawnCall: ...


class SpawnableFunction(Protocol):
    spawn: SpawnMethod


def modal_function_lookup(
    app_name: str, environment_name: str | None = None
) -> Callable[[str], SpawnableFunction]:
    """Deployed Modal functions by name, in ``environment_name`` (None: Modal's default, the
    profile's or ``MODAL_ENVIRONMENT``). ``from_name`` is lazy: nothing is contacted until spawn;
    its ``environment_name`` keyword is modal/_functions.py ``_Function.from_name`` (modal 1.x)."""
    import modal

    cache: dict[str, SpawnableFunction] = {}

    def lookup(function_name: str) -> SpawnableFunction:
        if function_name not in cache:
            function = modal.Function.from_name(
                app_name, function_name, environment_name=environment_name
            )
            cache[function_name] = cast(SpawnableFunction, function)
        return cache[function_name]

    return lookup


# The local stand-in for Modal, ``python -m modal_app.local_service``, started by ``enrich dev up``.
LOCAL_WORKERS_URL_ENV = "ENRICH_LOCAL_WORKERS_URL"
# The shared secret ``enrich dev up`` makes for the service and the conductor (a bearer token): the
# service refuses spawns without it, so neither a web page nor another local user can start work.
LOCAL_WORKERS_TOKEN_ENV = "ENRICH_LOCAL_WORKERS_TOKEN"
LOCAL_SPAWN_TIMEOUT_S = 30.0


@dataclass
class LocalCall:
    object_id: str


class _HttpSpawn:
    """``spawn.aio(tasks)`` as an HTTP call: the service starts the chunk and answers at once."""

    def __init__(self, url: str, timeout: float, token: str) -> None:
        self._url = url
        self._timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"}

    async def aio(self, *args: Any, **kwargs: Any) -> SpawnCall:
        if len(args) != 1 or kwargs:
            raise TypeError("spawn.aio() takes exactly one argument: the list of tasks")
        async with httpx.AsyncClient(timeout=self._timeout) as client:
            response = await client.post(self._url, json=args[0], headers=self._headers)
        if response.status_code != 200:
            raise RuntimeError(f"POST {self._url}: HTTP {response.status_code}: {response.text}")
        object_id = response.json().get("object_id")
        if not isinstance(object_id, str) or not object_id:
            raise RuntimeError(f"POST {self._url}: no object_id in {response.text!r}")
        return LocalCall(object_id)


class _HttpFunction:
    def __init__(self, url: str, timeout: float, token: str) -> None:
        self.spawn: SpawnMethod = _HttpSpawn(url, timeout, token)


def local_function_lookup(
    base_url: str, *, token: str | None = None, timeout: float = LOCAL_SPAWN_TIMEOUT_S
) -> Callable[[str], SpawnableFunction]:
    """Functions of the local stand-in for Modal at ``base_url``, as ``modal_function_lookup``
    gives deployed ones: ``POST {base_url}/functions/{name}/spawn`` with the task list, carrying
    ``token`` (default: ``ENRICH_LOCAL_WORKERS_TOKEN``, which ``enrich dev up`` sets)."""
    base = base_url.rstrip("/")
    secret = token if token is not None else os.environ.get(LOCAL_WORKERS_TOKEN_ENV, "")
    if not secret:
        raise ConfigurationError(
            f"the local worker service needs its token: {LOCAL_WORKERS_TOKEN_ENV} is not set "
            "(enrich dev up sets it for the conductor it starts)"
        )

    def lookup(function_name: str) -> SpawnableFunction:
        name = quote(function_name, safe="")
        return _HttpFunction(f"{base}/functions/{name}/spawn", timeout, secret)

    return lookup


class ModalDispatcher:
    """Spawns the deployed Modal function named by the registry, one call per chunk of rows (Modal's
    ``spawn_map`` returns no call ids, and a chunk per call keeps the State API calls bulk), and
    records each call id in the rows' meta. Never waits for the work."""

    def __init__(
        self,
        api: StateAPI,
        lookup: Callable[[str], SpawnableFunction],
        *,
        chunk_size: int = 100,
    ) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self._api = api
        self._lookup = lookup
        self._chunk_size = chunk_size

    def capacity(self) -> int | None:
        return None  # Modal scales out; the flow bounds a run with max_rows

    async def dispatch(self, function_name: str, claimed: Sequence[ClaimedTask]) -> None:
        function = self._lookup(function_name)
        for i in range(0, len(claimed), self._chunk_size):
            chunk = claimed[i : i + self._chunk_size]
            try:
                call = await function.spawn.aio([c.task.to_json() for c in chunk])
            except Exception as exc:
                raise DispatchError(
                    f"spawning {function_name} failed: {type(exc).__name__}: {exc}", claimed[i:]
                ) from exc
            await self._api.mark_dispatched([(c.task, call.object_id) for c in chunk])
