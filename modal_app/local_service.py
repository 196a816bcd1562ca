"""A local stand-in for Modal: ``python -m modal_app.local_service --port P`` (``enrich dev up``).

``POST /functions/{name}/spawn`` with the JSON list of tasks starts
``modal_app.entry.run_function_chunk(name, tasks)`` in the background, exactly what the deployed
Modal function runs, and answers ``{"object_id": "local-..."}`` at once, as ``Function.spawn``
does. The conductor reaches it through the same ``ModalDispatcher`` it uses for Modal, with
``flows.dispatchers.local_function_lookup``. ``GET /calls/{object_id}`` shows a call's state and
report, ``GET /health`` the service's.

Only the functions the Modal app defines (``modal_app.specs``) exist; another name is a 404, as an
undeployed function is on Modal. At most ``--max-concurrent`` chunks run at once (each opens its own
State API, as a Modal container does); the others wait their turn. On SIGTERM running chunks are
cancelled, which hands their unfinished rows back (``shared.worker``), and waiting chunks are
released the same way, so a restart loses nothing and burns no attempt.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from modal_app.entry import run_function_chunk
from modal_app.specs import FUNCTION_SPECS
from shared.state_api import TaskRef
from shared.state_factory import open_state_api

log = logging.getLogger("enrich.local_service")

CallState = Literal["queued", "running", "done", "failed", "cancelled"]
DEFAULT_MAX_CONCURRENT = 8
# Finished calls remembered for GET /calls/{id}; the oldest are forgotten first.
KEEP_CALLS = 1000
RELEASE_TIMEOUT_S = 10.0


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


def create_app(
    functions: Sequence[str] | None = None, *, max_concurrent: int = DEFAULT_MAX_CONCURRENT
) -> Starlette:
    pool = LocalFunctions(
        sorted(FUNCTION_SPECS) if functions is None else functions, max_concurrent=max_concurrent
    )

    async def spawn(request: Request) -> JSONResponse:
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
            for task in body:
                TaskRef.from_json(task)
        except (KeyError, ValueError, TypeError) as exc:
            return _error(422, f"invalid task: {type(exc).__name__}: {exc}")
        call = pool.spawn(name, body)
        return JSONResponse({"object_id": call.object_id})

    async def get_call(request: Request) -> JSONResponse:
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
    app = create_app(max_concurrent=args.max_concurrent)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level)
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
