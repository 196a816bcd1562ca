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
import re
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
from starlette.types import ASGIApp, Receive, Scope, Send

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


# An answer: its status, its text, and any extra headers (None: the client went away).
Answer = tuple[int, str, Mapping[str, str] | None]


class _CallbackEndpoint:
    """``POST /callbacks/{token}`` as a bare ASGI app: a provider's callback is the receiver's one
    hot path, and Starlette's request, response and middleware objects cost more CPU than the
    rest of it (bench/callbacks.py). Answers are the same JSON documents ``_answer`` renders."""

    def __init__(
        self,
        coalescer: Coalescer,
        keys: CallbackKeys,
        parsers: Mapping[str, Parser],
        max_body_bytes: int,
    ) -> None:
        self._coalescer = coalescer
        self._keys = keys
        self._parsers = parsers
        self._max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            answer = await self._answer(scope, receive)
        except Exception:
            # As Starlette's error handling does: a JSON 500, then the exception goes on up, so
            # the server logs the traceback.
            await _send_answer(send, 500, "internal error", None)
            raise
        if answer is not None:
            await _send_answer(send, *answer)

    async def _answer(self, scope: Scope, receive: Receive) -> Answer | None:
        # The token is a credential: it is never logged, and no answer repeats it.
        try:
            task = verify(scope["path_params"]["token"], self._keys)
        except InvalidToken as exc:
            log.info("callback refused: %s", exc)
            return 401, "invalid token", None
        except ExpiredToken:
            return 410, "expired token", None
        content_type, declared = "", ""
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-length":
                declared = value.decode("latin-1")
        if not _is_json(content_type):
            return 415, "not JSON: send Content-Type application/json", None
        limit = self._max_body_bytes
        if declared.isdigit() and int(declared) > limit:
            return 413, f"body over {limit} bytes", None
        # Never more than the limit + one chunk, whatever Content-Length says (it may be absent,
        # with chunked encoding, or lie).
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return 413, f"body over {limit} bytes", None
            chunks.append(chunk)
            more = message.get("more_body", False)
        try:
            data = json.loads(b"".join(chunks))
        except ValueError:  # UnicodeDecodeError included
            return 415, "not JSON", None
        except RecursionError:
            return 422, "JSON nested too deeply", None
        if not isinstance(data, dict):
            return 422, "the body must be a JSON object", None
        try:
            verdict = self._parsers.get(task.step_name, default_parser)(task, data)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("callback for %s: its parser refused the body (%r)", task.step_name, exc)
            return 422, f"a body {task.step_name} cannot read", None
        if verdict.task != task:  # a parser must answer for the attempt the token names
            raise RuntimeError(f"the parser of {task.step_name} answered for another attempt")
        try:
            outcome = await self._coalescer.apply(verdict)
        except DatabaseUnavailable:
            return 503, "database unavailable", {"Retry-After": str(RETRY_AFTER_SECONDS)}
        status, text = STATUS_FOR_OUTCOME[outcome]
        return status, text, None


async def _send_answer(
    send: Send, status: int, text: str, headers: Mapping[str, str] | None
) -> None:
    body = _ANSWER_BODIES.get(text) or _answer(status, text).body
    raw = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


# The common answers' bodies, rendered once (as JSONResponse renders them).
_ANSWER_BODIES = {
    text: bytes(_answer(status, text).body)
    for status, text in [*STATUS_FOR_OUTCOME.values(), (401, "invalid token")]
}
_CALLBACK_PATH = re.compile(r"/callbacks/([^/]+)")


class _CallbackApp(Starlette):
    """The receiver's Starlette app, which answers ``POST /callbacks/{token}`` itself, without
    going through its routing and middleware layers (they answer everything else: 404, 405)."""

    def __init__(self, endpoint: _CallbackEndpoint, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            match = _CALLBACK_PATH.fullmatch(scope["path"])
            if match is not None:
                scope["app"] = self
                scope["path_params"] = {"token": match[1]}
                await self._endpoint(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


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
    endpoint = _CallbackEndpoint(coalescer, keys, dict(parsers or {}), max_body_bytes)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _answer(exc.status_code, str(exc.detail).lower(), exc.headers)

    async def server_error(request: Request, exc: Exception) -> Response:
        # Starlette still re-raises it afterwards, so the server logs the traceback.
        return _answer(500, "internal error")

    return _CallbackApp(
        endpoint,
        routes=[Route("/callbacks/{token}", endpoint, methods=["POST"])],
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
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and an
    # accepted socket inherits this one's. Without it, Nagle's algorithm holds each answer's body
    # (uvicorn writes the head and the body apart) until the client's delayed ACK: 40 ms a request.
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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
    app: ASGIApp,
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
