"""ASYNC steps end to end: callbacks applied per second, and callback -> next step latency.

    .venv/bin/python bench/callbacks.py [--items 20000] [--delay-ms 0]

Runs N items through ``step_async`` (answered by the local provider emulator over real HTTP, after
``--delay-ms``) followed by a no-op step, with the real local runner and callback receiver, on the
database at DATABASE_URL or the embedded default. Prints callbacks applied per second (over the
span from the first submission to the last callback applied) and the p50/p99 time from a
callback applied (the ASYNC row COMPLETED) to the next step IN_PROGRESS.
Target on a 2-core machine: >= 2,000 callbacks/s. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import time
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import register_noop_steps
from shared.cli.callbacks import callback_receiver
from shared.db.connect import resolve_dsn
from shared.local import LocalRunner
from shared.pg_state import PgStateAPI
from shared.settings import get_settings

FIGURES_SQL = """
with a as (
  select item_id, started_at, finished_at, (meta -> 'awaiting' ->> 'since')::timestamptz as since
  from workflow_states where batch_id = %(batch_id)s and step_name = 'step_async'
), n as (
  select item_id, started_at from workflow_states
  where batch_id = %(batch_id)s and step_name = %(next)s
), h as (
  select a.*, extract(epoch from n.started_at - a.finished_at) * 1000 as ms
  from a join n using (item_id)
)
select count(*) filter (where since is not null) as submitted,
       extract(epoch from max(finished_at) - min(started_at)) as span_s,
       percentile_cont(0.5) within group (order by ms),
       percentile_cont(0.99) within group (order by ms)
from h
"""


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--delay-ms", type=int, default=0)
    parser.add_argument("--in-flight", type=int, default=600)
    args = parser.parse_args()

    dsn = await resolve_dsn()
    [next_step] = await register_noop_steps(dsn, 1)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "update enrichment_registry set config = config || %s where step_name = 'step_async'",
            (Jsonb({"delay_ms": args.delay_ms, "callback_timeout_seconds": 600}),),
        )
    api = await PgStateAPI.open(dsn, max_size=8)
    try:
        batch_id = await api.create_batch(
            ["step_async", next_step], [{"n": i} for i in range(args.items)], name="bench-callbacks"
        )
        start = time.perf_counter()
        async with callback_receiver(api, get_settings(), port=0) as url:
            runner = LocalRunner(
                dsn,
                api,
                batch_ids=[batch_id],
                max_in_flight=args.in_flight,
                sweep_interval=1.0,
                callback_url=url,
            )

            async def finished() -> bool:
                return (await api.batch_progress(batch_id)).finished

            await runner.run(until=finished)
        elapsed = time.perf_counter() - start
        progress = await api.batch_progress(batch_id)
    finally:
        await api.close()

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(FIGURES_SQL, {"batch_id": batch_id, "next": next_step})
        submitted, span, p50, p99 = await cur.fetchone() or (0, None, None, None)
    print(f"batch {batch_id}: {progress.status}, {progress.items_completed}/{args.items} completed")
    print(f"wall time {elapsed:.2f}s; {submitted} items submitted and answered by callback")
    if span:
        print(f"callbacks applied: {args.items / float(span):,.0f}/s over {float(span):.2f}s")
    if p50 is not None:
        print(f"callback applied -> next step IN_PROGRESS: p50 {p50:.1f} ms, p99 {p99:.1f} ms")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")


if __name__ == "__main__":
    asyncio.run(main())
