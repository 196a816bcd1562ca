"""``enrich serve`` killed with SIGKILL mid-batch and started again: nothing is lost, nothing runs
twice for one attempt, and the rows the kill interrupted come back with a higher attempt.

The steps use the handler of ``tests/plugins/recording.py`` (loaded through
``ENRICH_STEP_MODULES``), which records every start in the plain table ``recorded_starts`` before
sleeping: a second dispatch of the same (item, step, attempt) would show up as a second row.
Leases are 2 seconds, so rows held by the dead process come back quickly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from tests.conftest import wait_for
from tests.plugins.recording import CREATE_TABLE

REPO = Path(__file__).resolve().parents[1]
ENRICH = Path(sys.executable).parent / "enrich"
ITEMS = 300
STEPS = ("rec_one", "rec_two")
LEASE_SECONDS = 2
STEP_CONFIG = {
    "sleep_ms": 60,
    "timeout_seconds": LEASE_SECONDS,
    "max_attempts": 5,
    "backoff_seconds": 0,
}


class Server:
    """``enrich serve`` as a subprocess, its output in files (a full pipe would block it)."""

    def __init__(self, dsn: str, log_dir: Path, name: str) -> None:
        self.log = log_dir / f"{name}.log"
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "ENRICH_STEP_MODULES": "tests.plugins.recording",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(ENRICH),
                    "serve",
                    "--concurrency",
                    "40",
                    "--workers",
                    "2",
                    "--sweep-interval",
                    "0.3",
                ],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def assert_alive(self) -> None:
        assert self.proc.poll() is None, f"enrich serve exited early:\n{self.output()}"


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    yield started
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(timeout=10)


def query(dsn: str, text: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with psycopg.connect(dsn, autocommit=True, row_factory=dict_row) as conn:
        return conn.execute(text.encode(), params).fetchall()


def status_counts(dsn: str, batch_id: UUID) -> dict[str, int]:
    rows = query(
        dsn,
        "select status::text as status, count(*) as n from workflow_states"
        " where batch_id = %(b)s group by 1",
        {"b": batch_id},
    )
    return {r["status"]: int(r["n"]) for r in rows}


def register_recording_steps(dsn: str, steps: dict[str, dict[str, Any]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for step, config in steps.items():
            table = f"{step}_results"
            conn.execute(
                sql.SQL(
                    "create table {0} (like public.step_a_results including all);"
                    " alter table {0} enable row level security"
                ).format(sql.Identifier(table))
            )
            conn.execute(
                "insert into enrichment_registry"
                " (step_name, modal_function_name, results_table, config)"
                " values (%s, 'recording', %s, %s)",
                (step, table, Jsonb(config)),
            )


def create_batch(dsn: str, blueprint: list[str], items: int) -> UUID:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "select public.create_batch(%s, %s)",
            (
                Jsonb(blueprint),
                Jsonb([{"name": f"Company {i}", "website": f"c{i}.example"} for i in range(items)]),
            ),
        ).fetchone()
    assert row is not None
    batch_id: UUID = row[0]
    return batch_id


def test_serve_killed_mid_batch_and_restarted_loses_nothing_and_runs_nothing_twice(
    dsn: str, servers: list[Server], tmp_path: Path
) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(CREATE_TABLE)
    register_recording_steps(
        dsn,
        {
            **{step: STEP_CONFIG for step in STEPS},
            "rec_slow": {**STEP_CONFIG, "sleep_ms": 600_000},
        },
    )
    batch_id = create_batch(dsn, list(STEPS), ITEMS)
    total = ITEMS * len(STEPS)

    first = Server(dsn, tmp_path, "first")
    servers.append(first)

    def midway() -> bool:
        first.assert_alive()
        counts = status_counts(dsn, batch_id)
        done = counts.get("COMPLETED", 0)
        return ITEMS // 2 <= done < total - 100 and counts.get("IN_PROGRESS", 0) > 0

    wait_for(midway, timeout=30)
    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(timeout=10) == -signal.SIGKILL

    # Frozen now: nothing moves until a new server sweeps the dead one's leases.
    interrupted = {
        (r["item_id"], r["step_name"]): r["attempt"]
        for r in query(
            dsn,
            "select item_id, step_name, attempt from workflow_states"
            " where batch_id = %(b)s and status in ('QUEUED', 'IN_PROGRESS')",
            {"b": batch_id},
        )
    }
    completed_before = status_counts(dsn, batch_id).get("COMPLETED", 0)
    assert interrupted, "the kill interrupted no row: the test did not exercise a crash"
    assert 0 < completed_before < total

    second = Server(dsn, tmp_path, "second")
    servers.append(second)

    def batch_done() -> bool:
        second.assert_alive()
        rows = query(dsn, "select status::text as s from batches where id = %(b)s", {"b": batch_id})
        return rows[0]["s"] in ("COMPLETED", "FAILED")

    wait_for(batch_done, timeout=60)

    # Every item completed both steps.
    assert query(
        dsn, "select status::text as s from batches where id = %(b)s", {"b": batch_id}
    ) == [{"s": "COMPLETED"}]
    assert status_counts(dsn, batch_id) == {"COMPLETED": total}

    # No (item, step, attempt) was started twice: the plain log has no duplicate.
    duplicates = query(
        dsn,
        "select item_id, step_name, attempt, count(*) as n, array_agg(pid) as pids"
        " from recorded_starts group by 1, 2, 3 having count(*) > 1",
    )
    assert duplicates == []

    # One result per item per step, written by the attempt the row completed with, and that
    # attempt's start is on record.
    finals = {
        (r["item_id"], r["step_name"]): r["attempt"]
        for r in query(
            dsn,
            "select item_id, step_name, attempt from workflow_states where batch_id = %(b)s",
            {"b": batch_id},
        )
    }
    assert len(finals) == total
    for step in STEPS:
        results = query(
            dsn,
            sql.SQL(
                "select item_id, attempt, result, count(*) over (partition by item_id) as n"
                " from {} where batch_id = %(b)s"
            )
            .format(sql.Identifier(f"{step}_results"))
            .as_string(None),
            {"b": batch_id},
        )
        assert len(results) == ITEMS
        assert {r["n"] for r in results} == {1}
        for r in results:
            assert r["attempt"] == finals[(r["item_id"], step)] == r["result"]["attempt"]
    starts = {
        (r["item_id"], r["step_name"], r["attempt"]): r["pid"]
        for r in query(dsn, "select item_id, step_name, attempt, pid from recorded_starts")
    }
    for (item_id, step), attempt in finals.items():
        assert (item_id, step, attempt) in starts

    # The rows the kill interrupted were retried with a higher attempt, by the new server.
    for key, attempt_at_kill in interrupted.items():
        final = finals[key]
        assert final > attempt_at_kill, (key, attempt_at_kill, final)
        assert starts[(key[0], key[1], final)] == second.pid
    assert set(starts.values()) == {first.pid, second.pid}

    # SIGTERM while rows are in flight: the server hands them back and exits 0.
    slow_batch = create_batch(dsn, ["rec_slow"], 20)

    def slow_started() -> bool:
        second.assert_alive()
        return status_counts(dsn, slow_batch).get("IN_PROGRESS", 0) > 0

    wait_for(slow_started, timeout=30)
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(timeout=30) == 0, second.output()
    assert "stopped:" in second.output()
    leftover = query(
        dsn,
        "select count(*) as n from workflow_states where status in ('QUEUED', 'IN_PROGRESS')",
    )
    assert leftover == [{"n": 0}]
    slow_rows = query(
        dsn,
        "select status::text as s, attempt, retry_from, meta from workflow_states"
        " where batch_id = %(b)s",
        {"b": slow_batch},
    )
    assert {r["s"] for r in slow_rows} == {"PENDING"}
    released = [r for r in slow_rows if "released" in r["meta"]]
    assert released, slow_rows
    for r in released:
        # Released, not failed: the attempt is refunded and the reason is on record.
        assert r["retry_from"] == r["attempt"] == r["meta"]["released"]["attempt"]
        assert "last_error" not in r["meta"]
