"""End-to-end throughput of the real conductor loop and local workers with no-op steps.

    .venv/bin/python bench/throughput.py [--items 20000] [--steps 3]

Runs N items x S no-op steps (registered as noop_1..noop_S) through ``LocalRunner`` on the database
at DATABASE_URL, or the embedded default, and prints item-steps/s, the median and p99 hand-off time
(one step COMPLETED -> the next step IN_PROGRESS, per item), and the process's peak RSS.
Target on a 2-core machine: >= 5,000 item-steps/s for 20,000 x 3, hand-off median <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from pathlib import Path
from uuid import UUID

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.db.connect import resolve_dsn
from shared.local import LocalRunner
from shared.pg_state import PgStateAPI

HANDOFF_SQL = """
select percentile_cont(0.5) within group (order by ms) as median_ms,
       percentile_cont(0.99) within group (order by ms) as p99_ms,
       count(*) as handoffs
from (
  select extract(epoch from (lead(started_at) over w - finished_at)) * 1000 as ms
  from workflow_states
  where batch_id = %(batch_id)s
  window w as (partition by item_id order by step_index)
) h
where ms is not null
"""


async def register_noop_steps(dsn: str, steps: int) -> list[str]:
    names = [f"noop_{i}" for i in range(1, steps + 1)]
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        for name in names:
            await conn.execute(
                """insert into enrichment_registry
                     (step_name, modal_function_name, config, description)
                   values (%s, 'noop', '{"timeout_seconds": 120}', 'benchmark no-op step')
                   on conflict (step_name) do nothing""",
                (name,),
            )
    return names


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=600)
    parser.add_argument("--chunk", type=int, default=150)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--claim-limit", type=int, default=600)
    args = parser.parse_args()

    dsn = await resolve_dsn()
    blueprint = await register_noop_steps(dsn, args.steps)
    api = await PgStateAPI.open(dsn, max_size=args.workers + 4)
    try:
        created = time.perf_counter()
        batch_id: UUID = await api.create_batch(
            blueprint, [{"n": i} for i in range(args.items)], name="bench-throughput"
        )
        start = time.perf_counter()
        runner = LocalRunner(
            dsn,
            api,
            batch_ids=[batch_id],
            max_in_flight=args.in_flight,
            chunk_size=args.chunk,
            workers=args.workers,
            claim_limit=args.claim_limit,
            sweep_interval=1.0,
        )

        async def finished() -> bool:
            return (await api.batch_progress(batch_id)).finished

        stats = await runner.run(until=finished)
        elapsed = time.perf_counter() - start
        progress = await api.batch_progress(batch_id)
    finally:
        await api.close()

    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(HANDOFF_SQL, {"batch_id": batch_id})
        median_ms, p99_ms, handoffs = await cur.fetchone() or (None, None, 0)

    item_steps = args.items * args.steps
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"machine: {os.cpu_count()} cores")
    print(
        f"batch {batch_id}: {progress.status}, {progress.items_completed}/{args.items} items "
        f"completed, {progress.items_failed} failed"
    )
    print(f"create_batch: {start - created:.2f}s for {args.items} items")
    print(f"item-steps: {item_steps} in {elapsed:.2f}s = {item_steps / elapsed:,.0f} item-steps/s")
    print(
        f"hand-off (COMPLETED -> next IN_PROGRESS) over {handoffs} hand-offs: "
        f"median {median_ms:.1f} ms, p99 {p99_ms:.1f} ms"
    )
    print(
        f"conductor passes: {stats.passes}, notifications: {stats.notifications}, "
        f"chunks: {runner.dispatcher.stats.chunks}"
    )
    print(f"peak RSS: {peak_rss_mb:.0f} MB")


if __name__ == "__main__":
    asyncio.run(main())
