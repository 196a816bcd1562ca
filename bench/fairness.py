"""Fair claiming: a small tenant's batch behind a big batch of another tenant.

    ENRICH_HOME=$(mktemp -d) .venv/bin/python bench/fairness.py [--items 200000] [--steps 3]

Tenant A's batch of N items x S no-op steps runs through the real conductor loop and local workers
(``LocalRunner`` claiming every batch, as a production conductor does), on the database at
DATABASE_URL or a fresh embedded cluster. Once A runs, three phases of equal length:
  1. A alone;
  2. tenant B inserts a 10-item batch (plain SQL, as Supabase Studio does) every second;
  3. A alone again.
Prints, for B's batches: the time from creation to the first claim (batches.started_at) and to the
finish (batches.finished_at), the first batch and the spread over all; for A: item-steps/s in each
phase (B's phase against the mean of the two alone). Target: B's first claim within one claim
cycle of the conductor, its finish in seconds, A's rate down by less than 10%.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
from psycopg.types.json import Jsonb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.db.connect import resolve_dsn
from shared.local import LocalRunner
from shared.pg_state import PgStateAPI
from shared.state_api import ClaimedTask

TENANT_A = UUID("aaaaaaaa-0000-4000-8000-00000000000a")
TENANT_B = UUID("bbbbbbbb-0000-4000-8000-00000000000b")

# A Studio-style insert: the batch, then its items; the trigger seeds each item's first step.
INSERT_BATCH = "insert into batches (client_id, name, blueprint) values (%s, %s, %s) returning id"
INSERT_ITEMS = """
insert into batch_items (batch_id, raw_data)
select %s, jsonb_build_object('n', g) from generate_series(1, %s) g
"""
COMPLETED_BETWEEN = """
select count(*) from workflow_states
where batch_id = %s and status = 'COMPLETED' and finished_at >= %s and finished_at < %s
"""
SMALL_BATCHES = """
select id, created_at, started_at, finished_at, status::text from batches
where id = any(%s) order by created_at
"""


@dataclass
class Window:
    name: str
    start: datetime
    end: datetime


async def register_noop_steps(conn: psycopg.AsyncConnection[Any], steps: int) -> list[str]:
    names = [f"noop_{i}" for i in range(1, steps + 1)]
    for name in names:
        await conn.execute(
            """insert into enrichment_registry (step_name, modal_function_name, config, description)
               values (%s, 'noop', '{"timeout_seconds": 120}', 'benchmark no-op step')
               on conflict (step_name) do nothing""",
            (name,),
        )
    return names


async def create_batch(
    conn: psycopg.AsyncConnection[Any], client: UUID, name: str, blueprint: list[str], items: int
) -> UUID:
    async with conn.transaction():
        cur = await conn.execute(INSERT_BATCH, (client, name, Jsonb(blueprint)))
        row = await cur.fetchone()
        assert row is not None
        batch_id: UUID = row[0]
        await conn.execute(INSERT_ITEMS, (batch_id, items))
    return batch_id


async def db_now(conn: psycopg.AsyncConnection[Any]) -> datetime:
    cur = await conn.execute("select clock_timestamp()")
    row = await cur.fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


async def drive(
    conn: psycopg.AsyncConnection[Any], args: argparse.Namespace, blueprint: list[str]
) -> tuple[list[Window], list[UUID]]:
    """The three phases; returns their windows and B's batches (all finished)."""
    await asyncio.sleep(args.warmup)
    windows: list[Window] = []
    start = await db_now(conn)
    await asyncio.sleep(args.phase)
    windows.append(Window("A alone", start, start := await db_now(conn)))
    small: list[UUID] = []
    phase_end = time.monotonic() + args.phase
    while time.monotonic() < phase_end:
        small.append(
            await create_batch(conn, TENANT_B, f"small-{len(small)}", blueprint, args.small)
        )
        await asyncio.sleep(args.small_every)
    windows.append(Window("A + B's batches", start, start := await db_now(conn)))
    await asyncio.sleep(args.phase)
    windows.append(Window("A alone again", start, await db_now(conn)))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # B's last batch, if it is still running
        cur = await conn.execute(
            "select count(*) from batches where id = any(%s) and finished_at is null", (small,)
        )
        row = await cur.fetchone()
        if row is not None and row[0] == 0:
            break
        await asyncio.sleep(0.1)
    return windows, small


@dataclass
class Claim:
    at: float
    seconds: float
    rows: int


def time_claims(api: PgStateAPI) -> list[Claim]:
    """Wraps ``api.claim`` to record each claim's start, duration and size: one claim cycle is
    the time from one claim to the next."""
    claims: list[Claim] = []
    claim = api.claim

    async def timed(limit: int, **kwargs: Any) -> list[ClaimedTask]:
        start = time.perf_counter()
        claimed = await claim(limit, **kwargs)
        claims.append(Claim(start, time.perf_counter() - start, len(claimed)))
        return claimed

    api.claim = timed  # type: ignore[method-assign]
    return claims


def seconds(a: datetime | None, b: datetime | None) -> float | None:
    return None if a is None or b is None else (b - a).total_seconds()


def after(delay: float | None) -> str:
    return "never" if delay is None else f"{delay * 1000:.0f} ms after creation"


def spread(values: list[float]) -> str:
    if not values:
        return "none"
    return (
        f"median {statistics.median(values) * 1000:.0f} ms, max {max(values) * 1000:.0f} ms "
        f"(n={len(values)})"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000, help="A's batch (default 200,000)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--small", type=int, default=10, help="items per batch of B")
    parser.add_argument("--small-every", type=float, default=1.0, help="seconds between B's")
    parser.add_argument("--phase", type=float, default=10.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--in-flight", type=int, default=600)
    parser.add_argument("--chunk", type=int, default=150)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--claim-limit", type=int, default=600)
    args = parser.parse_args()

    dsn = await resolve_dsn()
    conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    async with conn:
        blueprint = await register_noop_steps(conn, args.steps)
        created = time.perf_counter()
        big = await create_batch(conn, TENANT_A, "bench-fairness-big", blueprint, args.items)
        print(f"A's batch: {args.items:,} items created in {time.perf_counter() - created:.1f}s")

        api = await PgStateAPI.open(dsn, max_size=args.workers + 4)
        claims = time_claims(api)
        try:
            runner = LocalRunner(
                dsn,
                api,
                max_in_flight=args.in_flight,
                chunk_size=args.chunk,
                workers=args.workers,
                claim_limit=args.claim_limit,
                sweep_interval=1.0,
            )
            running = asyncio.create_task(runner.run())
            began = time.perf_counter()
            try:
                windows, small = await drive(conn, args, blueprint)
            finally:
                runner.stop()
                stats = await running
            elapsed = time.perf_counter() - began
        finally:
            await api.close()

        rates: dict[str, float] = {}
        for w in windows:
            cur = await conn.execute(COMPLETED_BETWEEN, (big, w.start, w.end))
            row = await cur.fetchone()
            assert row is not None
            rates[w.name] = row[0] / (w.end - w.start).total_seconds()
        cur = await conn.execute(SMALL_BATCHES, (small,))
        rows = await cur.fetchall()

    to_claim = [s for r in rows if (s := seconds(r[1], r[2])) is not None]
    to_finish = [s for r in rows if (s := seconds(r[1], r[3])) is not None]
    gaps = [b.at - a.at for a, b in itertools.pairwise(claims)]
    print(f"machine: {os.cpu_count()} cores; A: {args.items:,} items x {args.steps} steps")
    print(
        f"conductor: {len(claims)} claims in {elapsed:.1f}s ({stats.passes} passes); claim "
        f"cycle (claim to next claim): {spread(gaps)}; a claim takes "
        f"{spread([c.seconds for c in claims])}, "
        f"{statistics.median([c.rows for c in claims]) if claims else 0:.0f} rows (median)"
    )
    if rows:
        first = rows[0]
        print(
            f"B's first batch ({args.small} items): first claim "
            f"{after(seconds(first[1], first[2]))}, finished "
            f"{after(seconds(first[1], first[3]))} ({first[4]})"
        )
    print(f"B's batches, creation -> first claim: {spread(to_claim)}")
    print(f"B's batches, creation -> finished:    {spread(to_finish)}")
    unfinished = sum(1 for r in rows if r[3] is None)
    if unfinished:
        print(f"B's batches not finished: {unfinished}")
    for name, rate in rates.items():
        print(f"A's item-steps/s, {name}: {rate:,.0f}")
    alone = (rates["A alone"] + rates["A alone again"]) / 2
    change = (rates["A + B's batches"] / alone - 1) * 100 if alone else 0.0
    print(f"A's rate with B against A alone (mean of both): {change:+.1f}%")


if __name__ == "__main__":
    asyncio.run(main())
