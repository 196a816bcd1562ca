"""A local stand-in for Modal: ``python -m modal_app.local_service --port P`` (``enrich dev up``).

``POST /functions/{name}/spawn`` with the JSON list of tasks starts
``modal_app.entry.run_function_chunk(name, tasks)`` in the background, exactly what the deployed
Modal function runs, and answers ``{"object_id": "local-..."}`` at once, as ``Function.spawn``
does. The conductor reaches it through the same ``ModalDispatcher`` it uses for Modal, with
``flows.dispatchers.local_function_lookup``. ``GET /calls/{object_id}`` shows a call's state and
report, ``GET /health`` the service's.

Only the functions the Modal app defines (``modal_app.specs``) exist; another name is a 404, as an
undeployed function is on Modal.

It listens on 127.0.0.1, where any web page the developer opens can post to it too (a ``text/plain``
form or ``fetch`` needs no CORS preflight), and so can any other local user. So, as Modal
authenticates callers: every request but ``/health`` must carry ``Authorization: Bearer <token>``,
the secret in ``ENRICH_LOCAL_WORKERS_TOKEN`` that ``enrich dev up`` makes for this service and the
conductor (the service refuses to start without one); a spawn must be ``application/json`` (which a
page cannot send cross-origin without a preflight this service never answers); and each task's step
must be one the registry runs with the function called (the registry's ``modal_function_name``), or
a row of one step would run under another step's handler and its result land in that step's results
table.

At most ``--max-concurrent`` chunks run at once (each opens its own State API, as a Modal container
does); the others wait their turn. On SIGTERM running chunks are cancelled, which hands their
unfinished rows back (``shared.worker``), and waiting chunks are released the same way, so a
restart loses nothing and burns no attempt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import logging
import os
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import psycopg
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from modal_app.entry import run_function_chunk
from modal_app.specs import FUNCTION_SPECS
from shared.db.connect import resolve_dsn
from shared.queries import query
from shared.state_api import TaskRef
from shared.state_factory import open_state_api

log = logging.getLogger("enrich.local_service")

CallState = Literal["queued", "running", "done", "failed", "cancelled"]
DEFAULT_MAX_CONCURRENT = 8
# Finished calls remembered for GET /calls/{id}; the oldest are forgotten first.
KEEP_CALLS = 1000
RELEASE_TIMEOUT_S = 10.0
# The bearer token of every request but /health (flows.dispatchers.LOCAL_WORKERS_TOKEN_ENV).
TOKEN_ENV = "ENRICH_LOCAL_WORKERS_TOKEN"

# step name -> the registry's modal_function_name, for the steps asked about that exist.
StepFunctions = Callable[[Sequence[str]], Awaitable[Mapping[str, str]]]


@dataclass
class Call:
    object_id: str
    function_name: str
    tasks: int
    state: CallState = "queued"
    created: float = field(default_factory=time.time)
    report: dict[str, Any] | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "object_id": self.object_id,
            "function_name": self.function_name,
            "tasks": self.tasks,
            "state": self.state,
            "created": self.created,
            "report": self.report,
            "error": self.error,
        }


class LocalFunctions:
    """Runs spawned chunks in the background, at most ``max_concurrent`` at once."""

    def __init__(
        self, functions: Sequence[str], *, max_concurrent: int = DEFAULT_MAX_CONCURRENT
    ) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent must be at least 1")
        self.functions = frozenset(functions)
        self._slots = asyncio.Semaphore(max_concurrent)
        self._running: set[asyncio.Task[None]] = set()
        self.calls: OrderedDict[str, Call] = OrderedDict()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def spawn(self, function_name: str, tasks: Sequence[Mapping[str, Any]]) -> Call:
        call = Call(f"local-{uuid.uuid4().hex}", function_name, len(tasks))
        self.calls[call.object_id] = call
        self._forget_old()
        task = asyncio.create_task(self._run(call, tasks), name=call.object_id)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return call

    async def _run(self, call: Call, tasks: Sequence[Mapping[str, Any]]) -> None:
        try:
            async with self._slots:
                call.state = "running"
                report = await run_function_chunk(call.function_name, tasks)
        except asyncio.CancelledError:
            if call.state == "queued":
                await _release(tasks, "local worker service stopped before starting the chunk")
            call.state = "cancelled"
            raise
        except Exception as exc:
            # The database was unreachable mid-chunk: the rows' leases bring them back.
            log.exception("%s: %d %s tasks failed", call.object_id, call.tasks, call.function_name)
            call.state, call.error = "failed", f"{type(exc).__name__}: {exc}"
            return
        call.state, call.report = "done", report
        log.info("%s: %s %s", call.object_id, call.function_name, report)

    def _forget_old(self) -> None:
        while len(self.calls) > KEEP_CALLS:
            oldest = next(iter(self.calls.values()))
            if oldest.state in ("queued", "running"):
                break
            self.calls.popitem(last=False)

    async def stop(self) -> None:
        """Cancel every chunk and wait for them to hand their rows back."""
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def _release(tasks: Sequence[Mapping[str, Any]], reason: str) -> None:
    try:
        refs = [TaskRef.from_json(t) for t in tasks]
        api = await open_state_api(max_size=1)
        try:
            await asyncio.wait_for(api.release(refs, reason), RELEASE_TIMEOUT_S)
        finally:
            await api.close()
    except Exception:
        log.warning("could not release %d tasks; their leases will", len(tasks), exc_info=True)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def registry_functions(step_names: Sequence[str]) -> dict[str, str]:
    """The registry's function of each of ``step_names`` (absent: no such step), read at each
    spawn so a step registered while the service runs is served at once. One short connection
    per spawn: a spawn carries a chunk of up to 100 rows, and a conductor pass costs far more."""
    dsn = await resolve_dsn()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(query("step_functions"), {"step_names": list(step_names)})
        return {str(step): str(function) for step, function in await cur.fetchall()}


def _authorized(request: Request, token: bytes) -> bool:
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    # Constant time: the comparison must not tell a caller how much of a guess was right.
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token)


def _is_json(request: Request) -> bool:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media_type == "application/json"


def create_app(
    functions: Sequence[str] | None = None,
    *,
    token: str,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    step_functions: StepFunctions = registry_functions,
) -> Starlette:
    """The service; ``token`` is the bearer token callers must present, ``step_functions`` how a
    task's step is checked against the function called (the registry, by default)."""
    if not token:
        raise ValueError("the local worker service needs a token")
    secret = token.encode()
    pool = LocalFunctions(
        sorted(FUNCTION_SPECS) if functions is None else functions, max_concurrent=max_concurrent
    )

    async def spawn(request: Request) -> JSONResponse:
        if not _authorized(request, secret):
            return _error(401, f"a bearer token is required (the service's {TOKEN_ENV})")
        if not _is_json(request):
            return _error(415, "the body must be application/json")
        name = request.path_params["name"]
        if name not in pool.functions:
            return _error(404, f"no function {name!r} (known: {', '.join(sorted(pool.functions))})")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be a JSON list of tasks")
        if not isinstance(body, list) or not all(isinstance(t, dict) for t in body):
            return _error(422, "the body must be a JSON list of task objects")
        try:
            refs = [TaskRef.from_json(task) for task in body]
        except (KeyError, ValueError, TypeError) as exc:
            return _error(422, f"invalid task: {type(exc).__name__}: {exc}")
        wrong = await _steps_not_of(name, refs, step_functions)
        if wrong:
            return _error(422, f"not steps of function {name!r}: {', '.join(wrong)}")
        call = pool.spawn(name, body)
        return JSONResponse({"object_id": call.object_id})

    async def get_call(request: Request) -> JSONResponse:
        if not _authorized(request, secret):
            return _error(401, f"a bearer token is required (the service's {TOKEN_ENV})")
        call = pool.calls.get(request.path_params["object_id"])
        if call is None:
            return _error(404, "unknown call")
        return JSONResponse(call.to_json())

    async def health(request: Request) -> JSONResponse:
        return JSONResponse(
            {"ok": True, "functions": sorted(pool.functions), "in_flight": pool.in_flight}
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await pool.stop()

    app = Starlette(
        routes=[
            Route("/functions/{name}/spawn", spawn, methods=["POST"]),
            Route("/calls/{object_id}", get_call, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    app.state.pool = pool
    return app


async def _steps_not_of(
    function_name: str, refs: Sequence[TaskRef], step_functions: StepFunctions
) -> list[str]:
    """The distinct steps of ``refs`` the registry does not run with ``function_name``."""
    steps = sorted({ref.step_name for ref in refs})
    if not steps:
        return []
    registered = await step_functions(steps)
    return [step for step in steps if registered.get(step) != function_name]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m modal_app.local_service", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        sys.exit(f"modal_app.local_service: set {TOKEN_ENV} (enrich dev up makes one)")
    app = create_app(token=token, max_concurrent=args.max_concurrent)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
