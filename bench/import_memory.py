"""Benchmark: import a 1,000,000-row CSV through ``shared.importer`` and measure peak memory.

    python bench/import_memory.py [--rows 1000000] [--steps step_a]

The CSV is generated into a temporary directory line by line (never held in memory), then imported
into ``DATABASE_URL`` (or the private cluster, started and migrated if needed). Prints rows/s, wall
time and the peak RSS of this process (``ru_maxrss``). The target is under 300 MB.

The import goes into a scratch database created next to that one (migrated, dropped afterwards), so
the benchmark leaves nothing behind; the server must allow CREATE DATABASE.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import random
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import make_conninfo

from shared.db.connect import resolve_dsn
from shared.db.migrate import migrate
from shared.importer import ImportProgress, import_csv

TARGET_MB = 300
HEADER = ["Company Name", "Website", "LinkedIn URL", "Country", "Employees", "Industry", "Notes"]
COUNTRIES = ["United States", "Germany", "France", "United Kingdom", "Canada", "Spain", "Brazil"]
INDUSTRIES = ["Software", "Logistics", "Fintech", "Healthcare", "Retail", "Manufacturing"]
WORDS = ["blue", "north", "quant", "leaf", "iron", "nova", "delta", "pixel", "harbor", "summit"]


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def write_csv(path: Path, rows: int, seed: int = 7) -> int:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(HEADER)
        for i in range(rows):
            stem = f"{rng.choice(WORDS)}{rng.choice(WORDS)}{i}"
            writer.writerow(
                [
                    f"{stem.title()} Labs, Inc.",
                    f"https://www.{stem}.com/",
                    f"https://www.linkedin.com/company/{stem}",
                    rng.choice(COUNTRIES),
                    str(rng.randint(1, 50_000)),
                    rng.choice(INDUSTRIES),
                    "" if i % 3 else f'Row {i} has "quotes", commas, and ünïcode',
                ]
            )
    return path.stat().st_size


@contextlib.asynccontextmanager
async def scratch_database(dsn: str) -> AsyncIterator[str]:
    """A fresh migrated database next to ``dsn``'s, dropped afterwards.

    Deleting a million-item batch from the shared database is slow (per-row cascades), and leaving
    it there would hand a million PENDING rows to the next conductor: use a throwaway database.
    """
    name = f"enrich_bench_{uuid.uuid4().hex[:12]}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
        await admin.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        scratch = make_conninfo(dsn, dbname=name)
        await migrate(scratch)
        yield scratch
    finally:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as admin:
            await admin.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )


async def run(rows: int, steps: str) -> int:
    base_dsn = await resolve_dsn()
    with tempfile.TemporaryDirectory(prefix="enrich-bench-") as tmp:
        path = Path(tmp) / "companies_1m.csv"
        t0 = time.perf_counter()
        size = write_csv(path, rows)
        print(f"generated {rows:,} rows ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
        rss_before = peak_rss_mb()

        def progress(p: ImportProgress) -> None:
            pct = 100 * p.bytes_read / p.total_bytes if p.total_bytes else 100.0
            print(
                f"  {p.rows_imported:>9,} rows  {pct:5.1f}%  peak RSS {peak_rss_mb():6.1f} MB",
                file=sys.stderr,
            )

        async with scratch_database(base_dsn) as dsn:
            t1 = time.perf_counter()
            report = await import_csv(
                dsn,
                path,
                steps,
                name="bench import_memory",
                progress=progress,
                progress_every=100_000,
            )
            wall = time.perf_counter() - t1
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                cur = await conn.execute(
                    "select count(*) from public.workflow_states where batch_id = %s",
                    (report.batch_id,),
                )
                row = await cur.fetchone()
                seeded = int(row[0]) if row else 0

    peak = peak_rss_mb()
    print(f"imported:   {report.rows_imported:,} rows, {seeded:,} first steps seeded")
    print(
        f"wall time:  {wall:.1f} s (streaming the rows {report.stream_seconds:.1f} s, "
        f"server finishing the COPY + trigger + commit {wall - report.stream_seconds:.1f} s)"
    )
    print(f"throughput: {report.rows_imported / wall:,.0f} rows/s")
    print(
        f"peak RSS:   {peak:.1f} MB "
        f"(before the import: {rss_before:.1f} MB; target < {TARGET_MB} MB)"
    )
    return 0 if peak < TARGET_MB and seeded == report.rows_imported else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--steps", default="step_a")
    args = parser.parse_args()
    return asyncio.run(run(args.rows, args.steps))


if __name__ == "__main__":
    sys.exit(main())
