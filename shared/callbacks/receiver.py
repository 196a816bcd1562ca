"""The callback receiver: ``POST /callbacks/{token}`` with a JSON body, applied in bulk.

One ASGI app for every place a provider calls back: uvicorn on 127.0.0.1 inside ``enrich run`` /
``enrich serve`` (``serve_callbacks``), and a web endpoint in production. The token says which
attempt the answer is for (``shared.callbacks.token``); a per-step parser turns the body into a
verdict; a coalescer applies the verdicts of a burst in one ``complete`` and one ``fail`` call.

Answers (a small JSON document, never a traceback):

=====  ==================================================================================
200    applied; or already applied (a replay: the row is no longer IN_PROGRESS, the State
       API answers ``wrong_status`` and writes nothing)
401    a malformed, forged or unknown-key token
409    an older attempt's callback (``stale_attempt``): a newer attempt owns the row
410    an expired token, or a row that is gone (``not_found``: its batch was deleted)
413    a body over ``max_body_bytes`` (by Content-Length, and counted while reading)
415    not JSON: another content type, or a body that does not parse
422    JSON that is not an object, or that the step's parser cannot read
503    the database is unreachable (Retry-After): providers retry
=====  ==================================================================================

Checks run cheapest first and before the body is read: the token, the content type, the size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.callbacks.token import CallbackKeys, ExpiredToken, InvalidToken, verify
from shared.errors import DatabaseUnavailable
from shared.state_api import Outcome, StateAPI, StepFailure, StepResult, TaskRef

log = logging.getLogger(__name__)

Verdict = StepResult | StepFailure
# A parser gets the attempt (from the verified token) to build the verdict for, and the body. It
# raises ValueError, KeyError or TypeError for a body it cannot read: the answer is then 422.
Parser = Callable[[TaskRef, Mapping[str, Any]], Verdict]

STATUS_FOR_OUTCOME = {
    Outcome.OK: (200, "applied"),
    Outcome.WRONG_STATUS: (200, "already applied"),
    Outcome.STALE_ATTEMPT: (409, "stale attempt"),
    Outcome.NOT_FOUND: (410, "gone"),
}
RETRY_AFTER_SECONDS = 5


def default_parser(task: TaskRef, body: Mapping[str, Any]) -> Verdict:
    """An object with a string "error" is a failure (retryable unless ``"retryable": false``);
    anything else is the step's result."""
    error = body.get("error")
    if isinstance(error, str):
        return StepFailure(task, error, retryable=body.get("retryable", True) is not False)
    return StepResult(task, dict(body))


class Coalescer:
    """Applies the verdicts of a burst in one ``complete`` and one ``fail`` call.

    The first verdict after a quiet spell waits up to ``window`` seconds (or until ``limit`` are
    waiting); one write runs at a time, and whatever arrived during it goes in the next write at
    once, so batches grow with the load instead of many small transactions competing for rows.
    Each caller awaits its own outcome.
    """

    def __init__(self, api: StateAPI, *, window: float, limit: int) -> None:
        self._api = api
        self._window = window
        self._limit = max(1, limit)
        self._waiting: list[tuple[Verdict, asyncio.Future[Outcome]]] = []
        self._full = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None

    async def apply(self, verdict: Verdict) -> Outcome:
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._waiting.append((verdict, future))
        if len(self._waiting) >= self._limit:
            self._full.set()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all())
        return await future

    async def _write_all(self) -> None:
        batch: list[tuple[Verdict, asyncio.Future[Outcome]]] = []
        try:
            if len(self._waiting) < self._limit:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._window)
            while self._waiting:
                batch, self._waiting = self._waiting[: self._limit], self._waiting[self._limit :]
                self._full.clear()
                await self._write(batch)
                batch = []
        except BaseException:  # cancelled (shutdown): no caller may wait forever
            for _, future in batch + self._waiting:
                future.cancel()
            self._waiting = []
            raise

    async def _write(self, batch: list[tuple[Verdict, asyncio.Future[Outcome]]]) -> None:
        # One verdict per row and call: a duplicate callback in the same burst is answered as a
        # replay, and the SQL never sees one row twice in a statement.
        first: dict[TaskRef, Verdict] = {}
        for verdict, _ in batch:
            first.setdefault(verdict.task, verdict)
        results = [v for v in first.values() if isinstance(v, StepResult)]
        failures = [v for v in first.values() if isinstance(v, StepFailure)]
        outcomes: dict[TaskRef, Outcome | Exception] = {}
        if results:
            try:
                outcomes.update((o.task, o.outcome) for o in await self._api.complete(results))
            except Exception as exc:  # each caller of this call gets the error
                outcomes.update((r.task, exc) for r in results)
        if failures:
            try:
                outcomes.update((o.task, o.outcome) for o in await self._api.fail(failures))
            except Exception as exc:
                outcomes.update((f.task, exc) for f in failures)
        for verdict, future in batch:
            if future.done():  # its request went away
                continue
            outcome = outcomes.get(verdict.task, Outcome.NOT_FOUND)
            if isinstance(outcome, Exception):
                future.set_exception(outcome)
            elif first[verdict.task] is not verdict and outcome is Outcome.OK:
                future.set_result(Outcome.WRONG_STATUS)
            else:
                future.set_result(outcome)


def _answer(status: int, text: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"status": text}, status_code=status, headers=headers)


def _is_json(content_type: str) -> bool:
    """application/json, or a JSON-based type (application/problem+json), any parameters."""
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, or None when it is over ``limit``: never reads more than ``limit`` + one chunk,
    whatever Content-Length says (it may be absent, with chunked encoding, or lie)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async with contextlib.aclosing(request.stream()) as stream:
        async for chunk in stream:
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
    """The receiver's ASGI app. ``parsers`` map a step name to its body parser
    (``default_parser`` otherwise)."""
    coalescer = Coalescer(api, window=batch_window_seconds, limit=batch_max)
    by_step = dict(parsers or {})

    async def callback(request: Request) -> Response:
        # The token is a credential: it is never logged, and no answer repeats it.
        try:
            task = verify(request.path_params["token"], keys)
        except InvalidToken as exc:
            log.info("callback refused: %s", exc)
            return _answer(401, "invalid token")
        except ExpiredToken:
            return _answer(410, "expired token")
        if not _is_json(request.headers.get("content-type", "")):
            return _answer(415, "not JSON: send Content-Type application/json")
        body = await _read_body(request, max_body_bytes)
        if body is None:
            return _answer(413, f"body over {max_body_bytes} bytes")
        try:
            data = json.loads(body)
        except ValueError:  # UnicodeDecodeError included
            return _answer(415, "not JSON")
        except RecursionError:
            return _answer(422, "JSON nested too deeply")
        if not isinstance(data, dict):
            return _answer(422, "the body must be a JSON object")
        try:
            verdict = by_step.get(task.step_name, default_parser)(task, data)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("callback for %s: its parser refused the body (%r)", task.step_name, exc)
            return _answer(422, f"a body {task.step_name} cannot read")
        if verdict.task != task:  # a parser must answer for the attempt the token names
            raise RuntimeError(f"the parser of {task.step_name} answered for another attempt")
        try:
            outcome = await coalescer.apply(verdict)
        except DatabaseUnavailable:
            return _answer(503, "database unavailable", {"Retry-After": str(RETRY_AFTER_SECONDS)})
        status, text = STATUS_FOR_OUTCOME[outcome]
        return _answer(status, text)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _answer(exc.status_code, str(exc.detail).lower(), exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette still re-raises it afterwards, so the server logs the traceback.
        return _answer(500, "internal error")

    return Starlette(
        routes=[Route("/callbacks/{token}", callback, methods=["POST"])],
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )


class _InProcessServer(uvicorn.Server):
    """uvicorn inside a running event loop. Its serve() replaces the SIGINT/SIGTERM handlers
    (uvicorn 0.54 server.py, ``capture_signals``): the CLI owns those, so this one leaves them."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


@dataclass
class CallbackServer:
    """A running receiver: ``port`` is the real one (port 0 picks a free port)."""

    host: str
    port: int
    _server: _InProcessServer
    _task: asyncio.Task[None]
    _socket: socket.socket

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self, timeout: float = 5.0) -> None:
        """Stop listening; requests in flight get ``timeout`` seconds to finish."""
        self._server.should_exit = True
        await asyncio.wait({self._task}, timeout=timeout)
        if not self._task.done():
            self._server.force_exit = True
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        self._socket.close()


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here rather than by uvicorn: on a bind error uvicorn calls
    sys.exit() inside its task (uvicorn 0.54 server.py, startup), and asyncio re-raises a
    SystemExit out of the event loop: the whole CLI would exit instead of reporting the port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"the callback receiver could not listen on {host}:{port}: {exc.strerror}"
        ) from None
    return sock


async def serve_callbacks(
    app: Starlette,
    host: str = "127.0.0.1",
    port: int = 8787,
    *,
    startup_timeout: float = 10.0,
) -> CallbackServer:
    """Serve ``app`` with uvicorn inside the running event loop; returns once it listens.
    Raises OSError when it cannot listen (the port is taken, say)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="off",
        access_log=False,  # an access log line would hold the token
        log_config=None,  # leave the process's logging as the CLI set it up
        log_level="warning",
    )
    sock = _listen(host, port)
    server = _InProcessServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + startup_timeout
    while not server.started:  # startup is a few event-loop turns, no I/O wait
        if task.done() or loop.time() > deadline:
            server.should_exit = True
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            sock.close()
            raise OSError(f"the callback receiver did not start on {host}:{port}")
        await asyncio.sleep(0.01)
    return CallbackServer(host, int(sock.getsockname()[1]), server, task, sock)
