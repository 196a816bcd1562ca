"""``enrich run`` as a process under faults (issue 11, items 2, 3, 7, 8): the database restarts or
crashes mid-run, stays away too long, is down at Ctrl-C; the process is killed with SIGKILL.

Each test runs the real command on a private cluster of its own (so it can stop and crash it),
with step_a/step_b sleeping 200 ms per item and 60 s leases: anything that waited for a lease to
expire would blow the deadlines.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg.types.json import Jsonb

from shared.db.embedded import EmbeddedPostgres
from shared.db.migrate import migrate
from shared.settings import Settings
from tests.conftest import wait_for

ENRICH = Path(sys.executable).parent / "enrich"
ITEMS = 300
STEP_CONFIG = {"sleep_ms": 200, "timeout_seconds": 60, "max_attempts": 2, "backoff_seconds": 0}


@dataclass
class Cluster:
    pg: EmbeddedPostgres
    dsn: str
    home: Path

    def stop(self, mode: str) -> None:
        pg_ctl = str(self.pg.bin_dir / "pg_ctl")
        result = self.pg._run_pg([pg_ctl, "stop", "-D", str(self.pg.data_dir), "-m", mode, "-w"])
        assert result.returncode == 0, result.stderr

    def start(self) -> None:
        self.pg.start()

    def counts(self) -> dict[str, int]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            rows = conn.execute(
                "select status::text, count(*) from workflow_states group by 1"
            ).fetchall()
        return {str(status): int(n) for status, n in rows}

    def completed(self) -> int:
        try:
            return self.counts().get("COMPLETED", 0)
        except psycopg.OperationalError:
            return 0


@pytest.fixture
def cluster(short_home: Path) -> Iterator[Cluster]:
    pg = EmbeddedPostgres(home=short_home, settings=Settings(enrich_home=short_home))
    dsn = pg.start()
    asyncio.run(migrate(dsn))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "update enrichment_registry set config = config || %s where step_name in"
            " ('step_a', 'step_b')",
            (Jsonb(STEP_CONFIG),),
        )
    yield Cluster(pg, dsn, short_home)


class Run:
    """``enrich run`` in the background, its output in files."""

    def __init__(self, cluster: Cluster, args: list[str], **env: str) -> None:
        self.out = cluster.home / f"run-{time.monotonic_ns()}.out"
        self.err = self.out.with_suffix(".err")
        environment = {**os.environ, "ENRICH_HOME": str(cluster.home), **env}
        environment.pop("DATABASE_URL", None)
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [str(ENRICH), "run", *args, "--concurrency", "50"],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=environment,
            )

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"enrich run hung for {timeout}s; stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def batch_id(self) -> str:
        """The batch of this run, from its stderr ("batch <id>" after the import)."""
        for line in self.stderr().splitlines():
            if line.startswith("batch "):
                return line.split()[1]
        pytest.fail(f"no batch id in stderr:\n{self.stderr()}")


def csv_file(cluster: Cluster) -> Path:
    path = cluster.home / "companies.csv"
    lines = ["website,name", *(f"https://c{i}.example,Company {i}" for i in range(ITEMS))]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_run(cluster: Cluster, **env: str) -> Run:
    run = Run(cluster, [str(csv_file(cluster)), "--steps", "step_a,step_b"], **env)
    wait_for(lambda: cluster.completed() >= 60, timeout=60)
    return run


def assert_all_completed(cluster: Cluster) -> None:
    assert cluster.counts() == {"COMPLETED": 2 * ITEMS}


def assert_no_traceback(run: Run) -> None:
    assert "Traceback" not in run.stderr(), run.stderr()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_run_rides_out_a_database_restart(cluster: Cluster, mode: str) -> None:
    run = start_run(cluster)
    cluster.stop(mode)
    cluster.start()
    assert run.wait(90) == 0, run.stderr()
    assert_all_completed(cluster)
    assert_no_traceback(run)


def test_a_database_gone_too_long_ends_the_run_with_its_resume_command(cluster: Cluster) -> None:
    run = start_run(cluster, ENRICH_DB_OUTAGE_SECONDS="2")
    cluster.stop("fast")
    code = run.wait(30)
    err = run.stderr()
    assert code == 1, err
    assert f"resume with: enrich run --batch {run.batch_id()}" in err
    assert "unreachable" in err
    assert_no_traceback(run)

    cluster.start()
    started = time.monotonic()
    resumed = Run(cluster, ["--batch", run.batch_id()])
    assert resumed.wait(60) == 0, resumed.stderr()
    # The rows the first run held came back at once (their holder is gone), not after 60 s leases.
    assert time.monotonic() - started < 40
    assert_all_completed(cluster)


def test_ctrl_c_while_the_database_is_down_stops_promptly(cluster: Cluster) -> None:
    run = start_run(cluster)
    cluster.stop("fast")
    time.sleep(0.5)  # let the run meet the outage; the stop must not depend on it
    started = time.monotonic()
    run.proc.send_signal(signal.SIGINT)
    code = run.wait(30)
    assert code == 130, run.stderr()
    assert time.monotonic() - started < 15
    assert f"resume with: enrich run --batch {run.batch_id()}" in run.stderr()
    assert_no_traceback(run)


def test_a_killed_run_resumes_at_once_without_losing_attempts(cluster: Cluster) -> None:
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        # One attempt each: a row the kill interrupted mid-step may use it, no other row may.
        conn.execute(
            "update enrichment_registry set config = config || '{\"max_attempts\": 1}'"
            " where step_name = 'step_a'"
        )
    run = start_run(cluster)
    run.proc.kill()
    run.proc.wait()

    started = time.monotonic()
    resumed = Run(cluster, ["--batch", run.batch_id()])
    code = resumed.wait(60)
    assert time.monotonic() - started < 40  # not waiting out 60 s leases
    assert code in (0, 3), resumed.stderr()
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "select status::text, step_name, meta->>'error' from workflow_states"
            " where status <> 'COMPLETED' or step_name = 'step_b'"
        ).fetchall()
    failed = [(step, error) for status, step, error in rows if status == "FAILED"]
    finished = [step for status, step, _ in rows if status == "COMPLETED"]
    assert {status for status, _, _ in rows} <= {"COMPLETED", "FAILED"}
    # Only a row that was mid-step when the process died may have used its single attempt.
    assert all(step == "step_a" and "is gone" in str(error) for step, error in failed), failed
    assert len(finished) + len(failed) == ITEMS
