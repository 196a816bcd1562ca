"""The callback receiver: ``POST /callbacks/{token}`` with a JSON body, applied in bulk.

One ASGI app for every place a provider calls back: uvicorn on 127.0.0.1 inside ``enrich run`` /
``enrich serve`` (``serve_callbacks``), and a web endpoint in production. The token says which
attempt the answer is for (``shared.callbacks.token``); a per-step parser turns the body into a
verdict; a coalescer applies the verdicts of a burst in one ``complete`` and one ``fail`` call.

Answers: 200 applied, or already applied (a replay changes nothing: the row is no longer
IN_PROGRESS); 409 an older attempt's callback; 410 an expired token or a row that is gone; 401 a
malformed, forged or unknown-key token; 413 a body over the limit; 415 not JSON; 422 JSON that is
not an object; 503 (Retry-After) while the database is unreachable: providers retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shared.callbacks.token import CallbackKeys, ExpiredToken, InvalidToken, verify
from shared.errors import DatabaseUnavailable
from shared.state_api import Outcome, StateAPI, StepFailure, StepResult, TaskRef

log = logging.getLogger(__name__)

Verdict = StepResult | StepFailure
Parser = Callable[[TaskRef, Mapping[str, Any]], Verdict]

STATUS_FOR_OUTCOME = {
    Outcome.OK: (200, "applied"),
    Outcome.WRONG_STATUS: (200, "already applied"),
    Outcome.STALE_ATTEMPT: (409, "stale attempt"),
    Outcome.NOT_FOUND: (410, "gone"),
}


def default_parser(task: TaskRef, body: Mapping[str, Any]) -> Verdict:
    """An object with a string "error" is a failure (``retryable``, default true); anything else
    is the step's result."""
    error = body.get("error")
    if isinstance(error, str):
        retryable = body.get("retryable", True)
        return StepFailure(task, error, retryable=retryable is not False)
    return StepResult(task, dict(body))


class Coalescer:
    """Collects verdicts for ``window`` seconds (or ``limit`` of them) and applies them in one
    ``complete`` and one ``fail`` call; each caller awaits its own outcome."""

    def __init__(self, api: StateAPI, *, window: float, limit: int) -> None:
        self._api = api
        self._window = window
        self._limit = limit
        self._waiting: list[tuple[Verdict, asyncio.Future[Outcome]]] = []
        self._full = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None

    async def apply(self, verdict: Verdict) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append((verdict, future))
        if len(self._waiting) >= self._limit:
            self._full.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())
        return await future

    async def _flush_soon(self) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._full.wait(), self._window)
        self._full.clear()
        batch, self._waiting = self._waiting, []
        try:
            outcomes = await self._write([v for v, _ in batch])
        except Exception as exc:  # every caller of this batch gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for verdict, future in batch:
            if not future.done():
                future.set_result(outcomes.get(verdict.task, Outcome.NOT_FOUND))
        if self._waiting:  # arrived during the write: their own flush
            self._flusher = asyncio.create_task(self._flush_soon())

    async def _write(self, verdicts: list[Verdict]) -> dict[TaskRef, Outcome]:
        results = [v for v in verdicts if isinstance(v, StepResult)]
        failures = [v for v in verdicts if isinstance(v, StepFailure)]
        outcomes: dict[TaskRef, Outcome] = {}
        if results:
            outcomes.update((o.task, o.outcome) for o in await self._api.complete(results))
        if failures:
            outcomes.update((o.task, o.outcome) for o in await self._api.fail(failures))
        return outcomes


def _answer(status: int, text: str, **extra: str) -> JSONResponse:
    return JSONResponse({"status": text}, status_code=status, headers=extra or None)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is over ``limit`` (never reads more than that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_callback_app(
    api: StateAPI,
    keys: CallbackKeys,
    *,
    parsers: Mapping[str, Parser] | None = None,
    max_body_bytes: int = 1_000_000,
    batch_window_seconds: float = 0.005,
    batch_max: int = 500,
) -> Starlette:
    coalescer = Coalescer(api, window=batch_window_seconds, limit=batch_max)
    by_step = dict(parsers or {})

    async def callback(request: Request) -> JSONResponse:
        try:
            task = verify(request.path_params["token"], keys)
        except InvalidToken:
            return _answer(401, "invalid token")
        except ExpiredToken:
            return _answer(410, "expired token")
        body = await _read_body(request, max_body_bytes)
        if body is None:
            return _answer(413, "body too large")
        if "json" not in request.headers.get("content-type", ""):
            return _answer(415, "not JSON")
        try:
            data = json.loads(body)
        except ValueError:
            return _answer(415, "not JSON")
        if not isinstance(data, dict):
            return _answer(422, "the body must be a JSON object")
        verdict = by_step.get(task.step_name, default_parser)(task, data)
        try:
            outcome = await coalescer.apply(verdict)
        except DatabaseUnavailable:
            return _answer(503, "database unavailable", **{"Retry-After": "5"})
        status, text = STATUS_FOR_OUTCOME[outcome]
        return _answer(status, text)

    return Starlette(routes=[Route("/callbacks/{token}", callback, methods=["POST"])])


class _InProcessServer(uvicorn.Server):
    """uvicorn inside a running event loop. Its serve() replaces the SIGINT/SIGTERM handlers
    (uvicorn 0.54 server.py, capture_signals): the CLI owns those, so this one leaves them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


@dataclass
class CallbackServer:
    """A running receiver: ``port`` is the real one (port 0 picks a free port)."""

    port: int
    _server: _InProcessServer
    _task: asyncio.Task[None]

    async def stop(self) -> None:
        self._server.should_exit = True
        await asyncio.wait({self._task}, timeout=5)


async def serve_callbacks(
    app: Starlette, host: str = "127.0.0.1", port: int = 8787
) -> CallbackServer:
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = _InProcessServer(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():  # the port was taken, say (uvicorn logs it and exits the task)
            with contextlib.suppress(BaseException):
                task.result()
            raise OSError(f"the callback receiver could not listen on {host}:{port}")
        await asyncio.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return CallbackServer(int(bound), server, task)


@contextlib.asynccontextmanager
async def running(app: Starlette, host: str, port: int) -> AsyncIterator[CallbackServer]:
    handle = await serve_callbacks(app, host, port)
    try:
        yield handle
    finally:
        await handle.stop()
