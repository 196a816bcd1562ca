"""``enrich run ... --steps normalize_domain,step_async`` end to end: the local receiver starts by
itself, the provider emulator calls back over real HTTP, and faults it injects (failures, dropped
and duplicated callbacks) still end with every item completed exactly once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

ENRICH = Path(sys.executable).parent / "enrich"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "companies.csv"


def test_step_async_runs_to_completion_through_real_callbacks(dsn: str, tmp_path: Path) -> None:
    faults = {
        "delay_ms": 20,
        "fail_every": 5,
        "drop_every": 7,
        "duplicate_every": 3,
        "fault_attempts": 1,
        "callback_timeout_seconds": 1,
        "backoff_seconds": 0,
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "update enrichment_registry set config = config || %s where step_name = 'step_async'",
            (Jsonb(faults),),
        )
    env = {**os.environ, "DATABASE_URL": dsn, "ENRICH_HOME": str(tmp_path)}
    done = subprocess.run(
        [str(ENRICH), "run", str(EXAMPLE), "--steps", "normalize_domain,step_async"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        states = conn.execute(
            "select status::text, count(*) from workflow_states where step_name = 'step_async'"
            " group by 1"
        ).fetchall()
        results = conn.execute("select count(*), count(distinct item_id) from step_async_results")
        retried = conn.execute(
            "select meta -> 'last_error' ->> 'kind', count(*) from workflow_states"
            " where step_name = 'step_async' and attempt > 1 group by 1"
        ).fetchall()
    assert states == [("COMPLETED", 300)]
    assert results.fetchone() == (300, 300)  # duplicated callbacks wrote nothing twice
    kinds = dict(retried)
    assert kinds.get("worker_error", 0) > 0  # failure callbacks were retried
    assert kinds.get("callback_timeout", 0) > 0  # dropped callbacks hit their deadline
