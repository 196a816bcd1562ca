"""ASYNC steps end to end: callbacks applied per second, and callback -> next step latency.

    .venv/bin/python bench/callbacks.py [--items 20000] [--delay-ms 0] [--receiver process]

Runs N items through ``step_async`` (answered by the local provider emulator over real HTTP, after
``--delay-ms``) followed by a no-op step, with the real local runner, on the database at
DATABASE_URL or the embedded default. The callbacks go over real HTTP to the real receiver app
(``create_callback_app`` served by ``serve_callbacks``), which applies them in bulk through the
real State API. Where the receiver runs is a choice, as in production:

``--receiver process`` (default)  its own process, as the receiver's web endpoint is in production
                                  (and ``enrich dev up``'s): one Python process cannot run the
                                  worker, the emulator and the receiver at 2,000 callbacks/s.
``--receiver inline``             inside the worker's process and event loop, as in ``enrich run``.

Prints callbacks applied per second (over the span from the first ASYNC row started to the last
callback applied), the p50/p99 time from a callback received (the receiver's app got the request)
to the next step IN_PROGRESS, the same from the callback applied (the ASYNC row COMPLETED), and
the CPU each part used (the worker's process, the receiver's, and the embedded cluster's server
processes): the CPU per callback is the figure that holds on a busy machine.
Target on a 2-core machine: >= 2,000 callbacks/s. Printed, never asserted.

What it took (2 cores, 20,000 items; see shared/providers/emulator.py, shared/callbacks/receiver.py
and supabase/migrations/20261130001000_callback_speed.sql): from 250/s to 2,400-2,600/s.
- Every answer of the receiver waited 40 ms: its socket did not say TCP, so asyncio never set
  TCP_NODELAY, and Nagle held the body until the client's delayed ACK.
- The emulator's httpx client cost 1.3 ms of CPU a callback; it sends over raw kept-alive
  connections now (40 us), 128 at once, so the receiver's bulk writes are up to 128 rows.
- The State API's per-task calls read every row awaiting a callback, in plans made from stale
  statistics; they look each task up by its key now.
- The receiver answers a callback without Starlette's layers (90 us instead of 130 us of CPU), and
  uvicorn parses HTTP with httptools when it is installed (a further 80 us).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import register_noop_steps
from shared.callbacks.receiver import create_callback_app, serve_callbacks
from shared.callbacks.token import InvalidToken, callback_urls, load_keys, verify
from shared.db.connect import resolve_dsn
from shared.db.embedded import EmbeddedPostgres
from shared.local import LocalRunner
from shared.pg_state import PgStateAPI
from shared.providers.emulator import EMULATOR
from shared.settings import get_settings

ROWS_SQL = """
select ws.item_id, ws.step_name, ws.started_at, ws.finished_at,
       (ws.meta -> 'awaiting' ->> 'since')::timestamptz as since
from workflow_states ws where ws.batch_id = %(batch_id)s
"""

BATCH_STATUS_SQL = "select status::text from batches where id = %(batch_id)s"

ASGI = Callable[..., Any]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# The receiver's process ---------------------------------------------------------------------------


def _receiver_process(conn: Connection, dsn: str) -> None:
    """Serve the receiver app until the parent says stop; then send back when each attempt's first
    callback was received (epoch seconds by item id) and this process's CPU seconds."""
    asyncio.run(_serve_receiver(conn, dsn))


def _timed(app: ASGI, received: dict[str, float]) -> ASGI:
    """The app, noting when each callback path first arrived (the bench's own bookkeeping)."""

    async def timed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            received.setdefault(scope["path"], time.time())
        await app(scope, receive, send)

    return timed


def _receipts(received: dict[str, float], keys: Any) -> dict[str, float]:
    by_item: dict[str, float] = {}
    for path, at in received.items():
        try:
            task = verify(path.rsplit("/", 1)[-1], keys)
        except InvalidToken:
            continue
        key = str(task.item_id)
        by_item[key] = min(at, by_item.get(key, at))
    return by_item


async def _serve_receiver(conn: Connection, dsn: str) -> None:
    keys = load_keys(get_settings())
    api = await PgStateAPI.open(dsn, max_size=4)
    received: dict[str, float] = {}
    server = await serve_callbacks(_timed(create_callback_app(api, keys), received), "127.0.0.1", 0)
    conn.send(server.url)
    cpu = _cpu_seconds()
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # "stop"
    cpu = _cpu_seconds() - cpu
    await server.stop()
    await api.close()
    conn.send((_receipts(received, keys), cpu))


@contextlib.asynccontextmanager
async def receiver_in_process(dsn: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """The receiver in a child process; yields its base URL and, once the block ends, a dict
    that gets its receipts and CPU."""
    parent, child = multiprocessing.get_context("spawn").Pipe()
    process = multiprocessing.get_context("spawn").Process(
        target=_receiver_process, args=(child, dsn), name="bench-receiver", daemon=True
    )
    process.start()
    loop = asyncio.get_running_loop()
    out: dict[str, Any] = {}
    try:
        url = await loop.run_in_executor(None, parent.recv)
        yield url, out
        parent.send("stop")
        out["receipts"], out["cpu"] = await loop.run_in_executor(None, parent.recv)
    finally:
        await loop.run_in_executor(None, process.join, 10)
        if process.is_alive():
            process.kill()


@contextlib.asynccontextmanager
async def receiver_inline(api: PgStateAPI) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    keys = load_keys(get_settings())
    received: dict[str, float] = {}
    server = await serve_callbacks(_timed(create_callback_app(api, keys), received), "127.0.0.1", 0)
    out: dict[str, Any] = {}
    try:
        yield server.url, out
    finally:
        await server.stop()
    out["receipts"], out["cpu"] = _receipts(received, keys), None


# Figures ------------------------------------------------------------------------------------------


def _postgres_cpu() -> float | None:
    """CPU seconds used so far by the embedded cluster's server processes (None: not embedded).
    A backend's CPU counts once it has exited (its parent reaps it), or while it runs."""
    settings = get_settings()
    if settings.database_dsn is not None:
        return None
    pid = EmbeddedPostgres(settings=settings).status().pid
    if pid is None:
        return None
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for i, p in enumerate([str(pid), *children]):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            # utime, stime (and for the postmaster cutime, cstime: the exited backends)
            total += sum(int(f) for f in fields[11 : 15 if i == 0 else 13])
    except OSError:
        return None
    return total / tick


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _describe(values: Sequence[float]) -> str:
    if not values:
        return "no data"
    return f"p50 {statistics.median(values):.1f} ms, p99 {_percentile(values, 0.99):.1f} ms"


async def run(args: argparse.Namespace) -> None:
    dsn = await resolve_dsn()
    [next_step] = await register_noop_steps(dsn, 1)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "update enrichment_registry set config = config || %s where step_name = 'step_async'",
            (Jsonb({"delay_ms": args.delay_ms, "callback_timeout_seconds": 600}),),
        )
    EMULATOR.connections = args.connections
    keys = load_keys(get_settings())
    api = await PgStateAPI.open(dsn, max_size=8)
    try:
        batch_id = await api.create_batch(
            ["step_async", next_step], [{"n": i} for i in range(args.items)], name="bench-callbacks"
        )
        receiver = receiver_in_process(dsn) if args.receiver == "process" else receiver_inline(api)
        async with receiver as (base, receiver_out):
            runner = LocalRunner(
                dsn,
                api,
                batch_ids=[batch_id],
                max_in_flight=args.in_flight,
                chunk_size=args.chunk,
                workers=args.workers,
                sweep_interval=1.0,
                callback_url=callback_urls(base, keys),
            )

            async def finished() -> bool:
                # The batch's own status (rolled up when its last row finishes): batch_progress
                # counts every row of the batch, and the runner asks after each quiet pass.
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    cur = await conn.execute(BATCH_STATUS_SQL, {"batch_id": batch_id})
                    row = await cur.fetchone()
                return row is not None and row[0] in ("COMPLETED", "FAILED")

            postgres_cpu, worker_cpu = _postgres_cpu(), _cpu_seconds()
            start = time.perf_counter()
            await runner.run(until=finished)
            elapsed = time.perf_counter() - start
            worker_cpu = _cpu_seconds() - worker_cpu
        progress = await api.batch_progress(batch_id)
    finally:
        await api.close()
    await asyncio.sleep(0.2)  # the pool's backends exit and are reaped: their CPU counts
    if postgres_cpu is not None:
        now_cpu = _postgres_cpu()
        postgres_cpu = None if now_cpu is None else now_cpu - postgres_cpu

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        rows = await (await conn.execute(ROWS_SQL, {"batch_id": batch_id})).fetchall()
    asynced = {r[0]: r for r in rows if r[1] == "step_async"}
    nexts = {r[0]: r for r in rows if r[1] == next_step}
    submitted = sum(1 for r in asynced.values() if r[4] is not None)
    receipts: dict[str, float] = receiver_out.get("receipts") or {}
    from_received, from_applied = [], []
    for item_id, n in nexts.items():
        a = asynced.get(item_id)
        if n[2] is None or a is None or a[3] is None:
            continue
        from_applied.append((n[2] - a[3]).total_seconds() * 1000)
        got = receipts.get(str(item_id))
        if got is not None:
            from_received.append((n[2].timestamp() - got) * 1000)
    starts = [r[2] for r in asynced.values() if r[2] is not None]
    ends = [r[3] for r in asynced.values() if r[3] is not None]
    span = (max(ends) - min(starts)).total_seconds() if starts and ends else 0.0

    print(f"machine: {os.cpu_count()} cores; receiver: {args.receiver}")
    print(f"batch {batch_id}: {progress.status}, {progress.items_completed}/{args.items} completed")
    print(
        f"wall time {elapsed:.2f}s; {submitted} items recorded as awaiting before their callback "
        "came (the rest were answered before the submission was recorded)"
    )
    if span:
        print(f"callbacks applied: {args.items / span:,.0f}/s over {span:.2f}s")
    print(f"callback received -> next step IN_PROGRESS: {_describe(from_received)}")
    print(f"callback applied  -> next step IN_PROGRESS: {_describe(from_applied)}")
    cpu = [f"worker process {worker_cpu:.2f}s"]
    if receiver_out.get("cpu") is not None:
        cpu.append(f"receiver process {receiver_out['cpu']:.2f}s")
    if postgres_cpu is not None:
        cpu.append(f"postgres {postgres_cpu:.2f}s")
    print(f"CPU over the {elapsed:.2f}s run: " + ", ".join(cpu))
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--in-flight", type=int, default=600)
    parser.add_argument("--chunk", type=int, default=150, help="the local pool's chunk size")
    parser.add_argument("--workers", type=int, default=4, help="the local pool's chunk spread")
    parser.add_argument(
        "--connections", type=int, default=EMULATOR.connections, help="the emulator's"
    )
    parser.add_argument("--receiver", choices=["process", "inline"], default="process")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
