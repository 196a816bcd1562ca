"""Relay ``pg_notify`` to Prefect events: ``python -m flows.relay`` (``enrich dev up``).

It stands in for what production does in the database (a pg_net request to the Prefect Cloud
webhook, which local PostgreSQL lacks): LISTEN on ``enrichment_state_changed`` and emit the Prefect
event ``enrichment.state.changed`` for the resource ``enrichment.database.<name>``, with the
notification's payload, which the conductor deployment's trigger turns into a flow run.

Bursts are coalesced like the webhook's SQL debounce: at most one event per ``--window`` seconds.
The first notification after a quiet spell goes out at once; the ones that follow within the window
are merged into one event at its end (the trailing edge is never dropped), so a wave of completions
costs one flow run, not one per statement. Events are best effort, as pg_net and webhooks are: one
that cannot be delivered is logged and dropped, and the deployment's schedule sweeps anyway. After a
lost LISTEN connection, one event is sent on reconnecting, since notifications may have been missed.

Needs ``PREFECT_API_URL``: without it Prefect would start a temporary server of its own and the
events would reach no deployment.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
from prefect.events import Event
from prefect.events.clients import EventsClient, get_events_client
from prefect.events.schemas.events import Resource

from shared.db.connect import resolve_dsn
from shared.local import CHANNEL

log = logging.getLogger("enrich.relay")

EVENT_NAME = "enrichment.state.changed"
RESOURCE_PREFIX = "enrichment.database."
DEFAULT_WINDOW_S = 1.0
# As the notification itself (pg_notify payloads stay under 8000 bytes): name at most 100 batches.
MAX_BATCH_IDS = 100

Payload = dict[str, Any]


def parse_payload(raw: str) -> Payload:
    """The notification's JSON object; anything else is kept as ``{"raw": ...}``.

    A wake-up hint only: any session that can connect may NOTIFY this channel with any text, so
    nothing is decided on it here but what the event shows. The event only starts a conductor run:
    the trigger passes none of the payload to it (its parameters are fixed, in ``flows.dev_serve``
    and ``prefect.yaml``), and the run reads which rows are ready from the tables, so a forged
    notification costs at most one idle run.
    """
    try:
        data = json.loads(raw)
    except ValueError:
        return {"raw": raw}
    return data if isinstance(data, dict) else {"raw": raw}


def merge_payloads(payloads: Sequence[Payload]) -> Payload:
    """One payload for a burst: the last ``op``, the union of ``batch_ids`` (at most 100, in first-
    seen order, ``more_batches`` when there were more), the sums of ``ready`` and ``finished``, and
    ``notifications``, how many were merged. A single payload passes through as it is, plus the
    count."""
    if len(payloads) == 1:
        return {**payloads[0], "notifications": 1}
    batch_ids: dict[str, None] = {}
    more = False
    ready = finished = 0
    op: Any = None
    for p in payloads:
        op = p.get("op", op)
        ids = p.get("batch_ids")
        if isinstance(ids, list):
            for b in ids:
                batch_ids[str(b)] = None
        more = more or bool(p.get("more_batches")) or "raw" in p
        ready += _count(p.get("ready"))
        finished += _count(p.get("finished"))
    names = list(batch_ids)
    return {
        "op": op,
        "batch_ids": names[:MAX_BATCH_IDS],
        "more_batches": more or len(names) > MAX_BATCH_IDS,
        "ready": ready,
        "finished": finished,
        "notifications": len(payloads),
    }


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Coalescer:
    """At most one ``emit`` per ``window`` seconds: the leading edge at once, the rest merged into
    one trailing call at the end of the window. ``add`` never blocks; ``run`` does the emitting."""

    def __init__(
        self,
        window: float,
        emit: Callable[[Payload], Awaitable[None]],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 0:
            raise ValueError("window must be >= 0")
        self._window = window
        self._emit = emit
        self._clock = clock
        self._pending: list[Payload] = []
        self._wake = asyncio.Event()
        self._last_emit = float("-inf")
        self.emitted = 0
        self.received = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, payload: Payload) -> None:
        self.received += 1
        self._pending.append(payload)
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            delay = self._last_emit + self._window - self._clock()
            if delay > 0:
                await asyncio.sleep(delay)  # what arrives meanwhile joins this event
            await self.flush()

    async def flush(self) -> None:
        """Emit what is pending now, as one event (nothing when nothing is pending)."""
        if not self._pending:
            return
        burst, self._pending = self._pending, []
        self._last_emit = self._clock()
        self.emitted += 1
        await self._emit(merge_payloads(burst))


class PrefectEmitter:
    """Sends events through one websocket (Prefect's events client), reopened after a failure."""

    def __init__(self, resource_id: str) -> None:
        self._resource = Resource(
            {"prefect.resource.id": resource_id, "prefect.resource.name": resource_id}
        )
        self._client: EventsClient | None = None

    async def connect(self) -> None:
        if self._client is None:
            client = get_events_client(reconnection_attempts=3)
            await client.__aenter__()
            self._client = client

    async def emit(self, payload: Payload) -> None:
        event = Event(event=EVENT_NAME, resource=self._resource, payload=payload)
        try:
            await self.connect()
            assert self._client is not None
            await self._client.emit(event)
        except Exception:
            log.warning("dropped %s %s: cannot reach Prefect", EVENT_NAME, payload, exc_info=True)
            await self.close()
            return
        log.info("emitted %s %s", EVENT_NAME, payload)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)


async def listen(
    dsn: str, coalescer: Coalescer, *, on_listening: Callable[[], None] | None = None
) -> None:
    """LISTEN with reconnects; after a reconnect, one catch-up event for what may have been lost."""
    delay = 0.5
    connected_before = False
    while True:
        try:
            async with await psycopg.AsyncConnection.connect(
                dsn, autocommit=True, application_name="enrich-relay"
            ) as conn:
                await conn.execute(f"LISTEN {CHANNEL}")
                delay = 0.5
                log.info("listening on %s", CHANNEL)
                if connected_before:
                    coalescer.add({"op": "RECONNECT", "more_batches": True})
                connected_before = True
                if on_listening is not None:
                    on_listening()
                async for note in conn.notifies():
                    coalescer.add(parse_payload(note.payload))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.warning("lost the LISTEN connection; reconnecting in %.1fs", delay, exc_info=True)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def relay(
    dsn: str, *, resource_id: str, window: float, ready_file: Path | None = None
) -> None:
    """Relay until SIGINT / SIGTERM, then send what is still pending and exit."""
    emitter = PrefectEmitter(resource_id)
    await emitter.connect()  # fail early when the server is unreachable
    coalescer = Coalescer(window, emitter.emit)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)

    def ready() -> None:
        if ready_file is not None:
            ready_file.write_text(f"{os.getpid()}\n")

    tasks = [
        asyncio.create_task(listen(dsn, coalescer, on_listening=ready), name="relay-listen"),
        asyncio.create_task(coalescer.run(), name="relay-emit"),
    ]
    stopped = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopped:
                task.result()  # a crashed task: raise its error
    finally:
        for task in (*tasks, stopped):
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await coalescer.flush()
        await emitter.close()
        log.info("stopped: %d notifications, %d events", coalescer.received, coalescer.emitted)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.relay", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--window", type=float, default=DEFAULT_WINDOW_S, help="Seconds per event, at most one."
    )
    parser.add_argument(
        "--resource-id",
        default=f"{RESOURCE_PREFIX}local",
        help="The event's resource (the trigger matches enrichment.database.*).",
    )
    parser.add_argument("--ready-file", type=Path, help="Written (with the pid) once LISTEN is up.")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if not os.environ.get("PREFECT_API_URL"):
        sys.exit("flows.relay: set PREFECT_API_URL to the Prefect server to send events to")
    dsn = asyncio.run(resolve_dsn())
    asyncio.run(
        relay(dsn, resource_id=args.resource_id, window=args.window, ready_file=args.ready_file)
    )


if __name__ == "__main__":
    main()
