"""Paid-provider throughput: ``exa_verify`` against the Exa stand-in, under a shared rate limit.

    .venv/bin/python bench/providers.py [--items 20000] [--rps 200] [--burst 200] [--latency-ms 50]

Starts the Exa stand-in (``shared.providers.exa_standin``) as its own process with the given
latency, creates a scratch database on the server of DATABASE_URL (or the embedded default),
migrates it, sets the ``exa`` provider's limit to ``--rps`` requests/s (burst ``--burst``), and
runs the real conductor loop and local workers (``LocalRunner``) twice over the same items:

1. every item calls the stand-in: prints the achieved calls/s (the stand-in's count over the span
   from the first call's start to the last one's, and over the wall time) and the busiest
   one-second window; target: within 5% of the limit;
2. the same items again (same client): every row is served from the result cache, with no call:
   prints rows/s (target: at least 5,000) and the calls made (0).

The step runs alone (blueprint ``exa_verify``) with its cache keyed on the raw ``domain`` and
``name`` fields, so the figures are the provider path's, not ``normalize_domain``'s. Prints, never
asserts; the scratch database is dropped unless ``--keep``. Benchmarks need a quiet machine: the
load average is printed first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.db.connect import resolve_dsn
from shared.db.migrate import migrate
from shared.local import LocalRunner
from shared.pg_state import PgStateAPI

REPO = Path(__file__).resolve().parent.parent
BENCH_CONFIG = {
    "needs": [],
    "timeout_seconds": 30,
    "cache": {"ttl_seconds": 86400, "key": ["domain", "name"]},
}

# Calls: rows of the batch that reached Exa (started by a worker; cache hits start in the settle).
CALLS_SQL = """
select count(*) filter (where not (meta ? 'cached')) as calls,
       extract(epoch from max(started_at) filter (where not (meta ? 'cached'))
                        - min(started_at) filter (where not (meta ? 'cached'))) as span,
       count(*) filter (where meta ? 'cached') as cached,
       count(*) filter (where status = 'COMPLETED') as completed
from workflow_states where batch_id = %(batch_id)s
"""
BUSIEST_SQL = """
select coalesce(max(n), 0) from (
  select count(*) over (order by started_at range between current row and '1 second' following) as n
  from workflow_states where batch_id = %(batch_id)s and not (meta ? 'cached')
) w
"""
LEDGER_SQL = """
select count(*), count(*) filter (where cached), coalesce(sum(usd), 0)
from provider_costs where batch_id = %(batch_id)s
"""


def start_standin(latency_ms: float) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared.providers.exa_standin",
            "--port",
            "0",
            "--latency-ms",
            str(latency_ms),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    return process, str(json.loads(process.stdout.readline())["exa_standin"])


def searches(base_url: str) -> int:
    return int(httpx.get(f"{base_url}/stats", timeout=10).json()["searches"])


async def scratch_database(server_dsn: str, name: str) -> str:
    admin = make_conninfo(server_dsn, dbname="postgres")
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
        )
        await conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    dsn = make_conninfo(server_dsn, dbname=name)
    await migrate(dsn)
    return dsn


async def drop_database(server_dsn: str, name: str) -> None:
    admin = make_conninfo(server_dsn, dbname="postgres")
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(
            sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
        )


async def explain_slow(server_dsn: str, name: str, ms: int) -> None:
    admin = make_conninfo(server_dsn, dbname="postgres")
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        for setting, value in (
            ("session_preload_libraries", "auto_explain"),
            ("auto_explain.log_min_duration", f"{ms}ms"),
            ("auto_explain.log_nested_statements", "on"),
            ("auto_explain.log_analyze", "on"),
        ):
            await conn.execute(
                sql.SQL("alter database {} set {} = {}").format(
                    sql.Identifier(name), sql.Identifier(*setting.split(".")), sql.Literal(value)
                )
            )


async def configure(dsn: str, rps: float, burst: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "update providers set requests_per_second = %s, burst = %s, max_concurrency = null,"
            " daily_cap = null, tokens = null where name = 'exa'",
            (rps, burst),
        )
        await conn.execute(
            "update enrichment_registry set config = (config - 'skip_unless') || %s::jsonb"
            " where step_name = 'exa_verify'",
            (json.dumps(BENCH_CONFIG),),
        )


async def run_batch(
    dsn: str, items: list[dict[str, Any]], args: argparse.Namespace
) -> tuple[UUID, float]:
    api = await PgStateAPI.open(dsn, max_size=args.workers + 4)
    try:
        batch_id = await api.create_batch(["exa_verify"], items, name="bench-providers")
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

        start = time.perf_counter()
        await runner.run(until=finished)
        return batch_id, time.perf_counter() - start
    finally:
        await api.close()


async def figures(dsn: str, batch_id: UUID) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute(CALLS_SQL, {"batch_id": batch_id})
        calls, span, cached, completed = await cur.fetchone() or (0, None, 0, 0)
        cur = await conn.execute(BUSIEST_SQL, {"batch_id": batch_id})
        busiest = (await cur.fetchone() or (0,))[0]
        cur = await conn.execute(LEDGER_SQL, {"batch_id": batch_id})
        ledger_rows, ledger_cached, usd = await cur.fetchone() or (0, 0, 0)
    return {
        "calls": int(calls),
        "span": float(span) if span is not None else None,
        "cached": int(cached),
        "completed": int(completed),
        "busiest": int(busiest),
        "ledger_rows": int(ledger_rows),
        "ledger_cached": int(ledger_cached),
        "usd": float(usd),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--rps", type=float, default=200.0)
    parser.add_argument(
        "--burst", type=int, help="the bucket's burst (default: one second's worth, as for exa)"
    )
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--in-flight", type=int, default=600)
    parser.add_argument("--chunk", type=int, default=150)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--claim-limit", type=int, default=600)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    parser.add_argument(
        "--explain-slow-ms",
        type=int,
        help="log the plans of statements slower than this (auto_explain) to the server's log",
    )
    args = parser.parse_args()
    if args.burst is None:
        args.burst = max(1, round(args.rps))

    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
    server = await resolve_dsn()
    name = f"enrich_bench_providers_{os.getpid()}"
    dsn = await scratch_database(server, name)
    await configure(dsn, args.rps, args.burst)
    if args.explain_slow_ms is not None:
        await explain_slow(server, name, args.explain_slow_ms)
    standin, base_url = start_standin(args.latency_ms)
    os.environ["EXA_BASE_URL"] = base_url
    os.environ["EXA_API_KEY"] = "bench-key"
    items = [
        {"name": f"Company {i} Holdings", "domain": f"company{i}.com"} for i in range(args.items)
    ]
    print(
        f"scratch database {conninfo_to_dict(dsn).get('dbname')}; Exa stand-in at {base_url}, "
        f"{args.latency_ms:g} ms latency; provider limit {args.rps:g} requests/s, burst "
        f"{args.burst}; exa_verify config += {json.dumps(BENCH_CONFIG)}"
    )
    try:
        before = searches(base_url)
        first, elapsed = await run_batch(dsn, items, args)
        paid = await figures(dsn, first)
        made = searches(base_url) - before
        span = paid["span"] or float("nan")
        rate = (paid["calls"] - 1) / span if paid["calls"] > 1 else float("nan")
        print(
            f"run 1: {paid['completed']:,}/{args.items:,} rows completed in {elapsed:.2f}s; "
            f"{made:,} calls reached the stand-in"
        )
        print(
            f"  achieved {rate:,.1f} calls/s over {span:.2f}s from the first call to the last "
            f"({rate / args.rps - 1:+.1%} against the {args.rps:g}/s limit; target within 5%), "
            f"{made / elapsed:,.1f} calls/s over the wall time; busiest second "
            f"{paid['busiest']} calls"
        )
        print(
            f"  ledger: {paid['ledger_rows']:,} rows, ${paid['usd']:.2f} "
            f"({paid['ledger_cached']} cached)"
        )

        before = searches(base_url)
        second, elapsed = await run_batch(dsn, items, args)
        hits = await figures(dsn, second)
        made = searches(base_url) - before
        print(
            f"run 2 (same items): {hits['completed']:,}/{args.items:,} rows completed in "
            f"{elapsed:.2f}s = {hits['completed'] / elapsed:,.0f} rows/s (target >= 5,000); "
            f"{hits['cached']:,} from the cache, {made} calls reached the stand-in; ledger "
            f"{hits['ledger_cached']:,} cached rows, ${hits['usd']:.2f}"
        )
    finally:
        standin.terminate()
        standin.wait(timeout=10)
        if not args.keep:
            await drop_database(server, name)


if __name__ == "__main__":
    asyncio.run(main())
