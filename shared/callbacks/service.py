"""The callback receiver as a service of its own: the Modal web endpoint in production
(``modal_app/app.py``, ``callbacks``) and a process of ``enrich dev up``.

The same ASGI app as the listener inside ``enrich run`` (``create_callback_app``), wrapped in a
lifespan that opens the State API when the server starts (Modal runs ASGI lifespan events:
modal/_runtime/asgi.py, ``LifespanManager``) and closes it when the server stops. The keys come
from the environment only (``configured_keys``): in production the workers that sign and the
receiver that verifies run in different containers, and must hold the same key.

    python -m shared.callbacks.service --port 8787      # what enrich dev up runs
"""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route
from starlette.types import Receive, Scope, Send

from shared.callbacks.receiver import Parser, create_callback_app
from shared.callbacks.token import CallbackKeys, configured_keys, load_keys
from shared.settings import get_settings
from shared.state_api import StateAPI
from shared.state_factory import open_state_api

log = logging.getLogger(__name__)


def step_parsers() -> Mapping[str, Parser]:
    """The callback body parsers of the registered steps (``default_parser`` for the others)."""
    from shared.steps import CALLBACK_PARSERS  # the steps import providers: only when serving

    return CALLBACK_PARSERS


def create_callback_service(
    *,
    keys: CallbackKeys | None = None,
    open_api: Callable[[], Awaitable[StateAPI]] = open_state_api,
    parsers: Mapping[str, Parser] | None = None,
) -> Starlette:
    """``POST /callbacks/{token}`` (the receiver) and ``GET /health``. ``keys``: from the
    environment (``ENRICH_CALLBACK_SECRET``) unless given; a missing key fails here, at start-up,
    not at the first callback."""
    keys = keys if keys is not None else configured_keys(get_settings())
    receiver: list[Starlette] = []  # set while the server runs

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        api = await open_api()
        try:
            receiver.append(create_callback_app(api, keys, parsers=parsers or step_parsers()))
            yield
        finally:
            receiver.clear()
            await api.close()

    async def callbacks(scope: Scope, receive: Receive, send: Send) -> None:
        if not receiver:  # a request outside the lifespan: nothing to apply it with
            await JSONResponse({"status": "starting"}, 503, {"Retry-After": "5"})(
                scope, receive, send
            )
            return
        await receiver[0](scope, receive, send)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": bool(receiver)}, 200 if receiver else 503)

    return Starlette(
        routes=[Route("/health", health, methods=["GET"]), Mount("/", app=callbacks)],
        lifespan=lifespan,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shared.callbacks.service", description="The ASYNC callback receiver."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8787)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # On this machine the workers and the receiver share ENRICH_HOME, so its key file will do.
    app = create_callback_service(keys=load_keys(get_settings()))
    # No access log: each line would carry a token, a bearer credential.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False)


if __name__ == "__main__":
    main()
