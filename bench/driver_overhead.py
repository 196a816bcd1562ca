"""psycopg 3 (async) against SQLAlchemy's async engine for the State API's bulk calls.

    .venv/bin/python bench/driver_overhead.py [--rows 500] [--rounds 40]

Each round creates a batch of --rows items and runs claim, start and complete on all of them in
bulk, through (a) PgStateAPI on a psycopg pool and (b) the same SQL functions through a SQLAlchemy
AsyncEngine (postgresql+psycopg) with text() statements. Prints rows/s and the time per call for
each. The database is DATABASE_URL or the embedded default.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.db.connect import resolve_dsn
from shared.pg_state import PgStateAPI
from shared.state_api import StepResult

BLUEPRINT = ["noop_bench"]


async def register(dsn: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "insert into enrichment_registry (step_name, modal_function_name, config)"
            " values ('noop_bench', 'noop', '{}') on conflict do nothing"
        )


async def with_psycopg(dsn: str, rows: int, rounds: int) -> list[float]:
    times = []
    async with await PgStateAPI.open(dsn) as api:
        for _ in range(rounds):
            batch = await api.create_batch(BLUEPRINT, [{"n": i} for i in range(rows)])
            t = time.perf_counter()
            claimed = await api.claim(rows, batch_ids=[batch])
            started = await api.start([c.task for c in claimed])
            await api.complete([StepResult(s.task, {}) for s in started])
            times.append(time.perf_counter() - t)
    return times


async def with_sqlalchemy(dsn: str, rows: int, rounds: int) -> list[float]:
    engine = create_async_engine(
        "postgresql+psycopg://", async_creator=lambda: psycopg.AsyncConnection.connect(dsn)
    )
    times = []
    try:
        async with engine.connect() as conn:
            for _ in range(rounds):
                items = json.dumps([{"n": i} for i in range(rows)])
                batch = (
                    await conn.execute(
                        text("select create_batch(cast(:b as jsonb), cast(:i as jsonb))"),
                        {"b": json.dumps(BLUEPRINT), "i": items},
                    )
                ).scalar_one()
                await conn.commit()
                t = time.perf_counter()
                claimed = (
                    (
                        await conn.execute(
                            text("select * from claim_steps(:n, null, array[cast(:b as uuid)])"),
                            {"n": rows, "b": str(batch)},
                        )
                    )
                    .mappings()
                    .all()
                )
                await conn.commit()
                tasks: list[dict[str, Any]] = [
                    {
                        "batch_id": str(r["batch_id"]),
                        "item_id": str(r["item_id"]),
                        "step_name": r["step_name"],
                        "attempt": r["attempt"],
                    }
                    for r in claimed
                ]
                started = (
                    (
                        await conn.execute(
                            text("select * from start_steps(cast(:t as jsonb))"),
                            {"t": json.dumps(tasks)},
                        )
                    )
                    .mappings()
                    .all()
                )
                await conn.commit()
                results = [{**t_, "result": {}} for t_, s in zip(tasks, started, strict=True)]
                (
                    await conn.execute(
                        text("select * from complete_steps(cast(:r as jsonb))"),
                        {"r": json.dumps(results)},
                    )
                ).all()
                await conn.commit()
                times.append(time.perf_counter() - t)
    finally:
        await engine.dispose()
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    dsn = await resolve_dsn()
    await register(dsn)
    for name, fn in (("psycopg", with_psycopg), ("sqlalchemy", with_sqlalchemy)):
        await fn(dsn, args.rows, 3)  # warm-up: prepared statements, plan caches
        times = await fn(dsn, args.rows, args.rounds)
        median = statistics.median(times)
        print(
            f"{name:10s}: claim+start+complete of {args.rows} rows: median {median * 1000:.1f} ms"
            f" = {args.rows / median:,.0f} item-steps/s ({args.rounds} rounds)"
        )


if __name__ == "__main__":
    asyncio.run(main())
