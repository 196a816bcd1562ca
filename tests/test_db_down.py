"""``enrich db down`` beside the commands that use the private cluster (issue 10, items 7 and 9).

It refuses while ``enrich run`` / ``enrich serve`` (or any other client) is connected, naming who
and how to stop them; ``--force`` stops it anyway, and a run cut off that way ends at once with one
line and its resume command, the next run taking back the rows it held at once. A command that
started the private cluster says, once, that it stays running.

Each test stops a cluster of its own (``tests.test_run_faults``: 300 items, steps sleeping 200 ms,
60 s leases), never the shared test server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from shared.cli.dev_commands import Layout, start_process
from shared.db.clients import Client, in_use_message
from tests.conftest import wait_for
from tests.test_run_faults import (
    ENRICH,
    Cluster,
    Run,
    assert_all_completed,
    assert_no_traceback,
    cluster,
    start_run,
)

__all__ = ["cluster"]  # the fixture, shared with test_run_faults

LEFT_RUNNING = "stays running for the next command; stop it with `enrich db down`"


def enrich(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ENRICH_HOME": str(cluster.home)}
    env.pop("DATABASE_URL", None)
    return subprocess.run(
        [str(ENRICH), *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def connected(cluster: Cluster, prefix: str) -> bool:
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity where application_name like %s",
            (f"{prefix}%",),
        ).fetchone()
    return row is not None and row[0] > 0


def test_db_down_refuses_while_a_run_uses_the_cluster(cluster: Cluster) -> None:
    run = start_run(cluster)
    refused = enrich(cluster, "db", "down")
    assert refused.returncode == 1, refused.stderr
    message = refused.stderr.strip()
    assert len(message.splitlines()) == 1, message
    assert (
        f"the private PostgreSQL at {cluster.home} is in use by enrich run (pid {run.proc.pid})"
        in message
    )
    assert f"`kill {run.proc.pid}`" in message
    assert "`enrich db down --force`" in message
    # Nothing was stopped: the run goes on to the end.
    assert run.wait(90) == 0, run.stderr()
    assert_all_completed(cluster)


def test_force_stops_a_run_with_one_line_and_the_resume_finishes_every_row(
    cluster: Cluster,
) -> None:
    run = start_run(cluster)
    forced = enrich(cluster, "db", "down", "--force")
    assert forced.returncode == 0, forced.stderr
    # At once, not after ENRICH_DB_OUTAGE_SECONDS (300 s) of waiting for a database nobody brings
    # back.
    assert run.wait(20) == 1, run.stderr()
    assert_no_traceback(run)
    batch = run.batch_id()
    after_import = run.stderr().split(f"batch {batch}\n", 1)[1]
    lines = [line for line in after_import.splitlines() if not line.startswith("[")]
    assert len(lines) == 1, after_import
    assert lines[0].startswith(
        f"error: the private PostgreSQL at {cluster.home} was stopped by "
        "`enrich db down --force` (pid "
    ), lines[0]
    assert lines[0].endswith(f"nothing is lost, resume with: enrich run --batch {batch}")

    started = time.monotonic()
    resumed = Run(cluster, ["--batch", batch])
    assert resumed.wait(60) == 0, resumed.stderr()
    # The rows the stopped run held came back at once (their holder is gone), not after 60 s.
    assert time.monotonic() - started < 40
    assert "took back" in resumed.stderr()
    assert_all_completed(cluster)
    # The resume started the cluster again, and says once that it stays running.
    assert resumed.stderr().count(LEFT_RUNNING) == 1, resumed.stderr()


def test_serve_is_named_and_ends_with_one_line_when_forced(cluster: Cluster) -> None:
    env = {**os.environ, "ENRICH_HOME": str(cluster.home)}
    env.pop("DATABASE_URL", None)
    err = cluster.home / "serve.err"
    with err.open("wb") as fh:
        serve = subprocess.Popen(
            [str(ENRICH), "serve", "--callback-port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=fh,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    try:
        wait_for(lambda: connected(cluster, f"enrich serve (pid {serve.pid})"), timeout=30)
        refused = enrich(cluster, "db", "down")
        assert refused.returncode == 1
        assert f"in use by enrich serve (pid {serve.pid})" in refused.stderr, refused.stderr
        assert serve.poll() is None

        assert enrich(cluster, "db", "down", "--force").returncode == 0
        assert serve.wait(20) == 1
    finally:
        if serve.poll() is None:
            serve.kill()
            serve.wait()
    stderr = err.read_text()
    assert "Traceback" not in stderr, stderr
    assert (
        stderr.strip().splitlines()[-1].endswith("nothing is lost, start again with: enrich serve")
    ), stderr


def test_db_down_names_other_clients(cluster: Cluster) -> None:
    with psycopg.connect(cluster.dsn, autocommit=True, application_name="psql"):
        refused = enrich(cluster, "db", "down")
        assert refused.returncode == 1
        expected = "is in use by psql: stop it first (close the other sessions)"
        assert expected in refused.stderr, refused.stderr
    assert enrich(cluster, "db", "down").returncode == 0
    assert not cluster.pg.status().running


def test_a_command_that_starts_the_cluster_says_once_that_it_stays_running(
    cluster: Cluster,
) -> None:
    assert cluster.pg.stop()
    first = enrich(cluster, "batch", "list")
    assert first.returncode == 0, first.stderr
    assert first.stderr.count(LEFT_RUNNING) == 1, first.stderr
    assert f"the private PostgreSQL at {cluster.home} {LEFT_RUNNING}" in first.stderr
    # Running already: this command did not start it, and says nothing about it.
    second = enrich(cluster, "batch", "list")
    assert second.returncode == 0, second.stderr
    assert LEFT_RUNNING not in second.stderr


def test_the_stop_note_lasts_until_the_next_start(cluster: Cluster) -> None:
    assert cluster.pg.stopped_by() is None
    assert cluster.pg.stop(by="a test")
    assert cluster.pg.stopped_by() == "a test"
    cluster.pg.start()
    assert cluster.pg.stopped_by() is None


def test_the_message_says_how_to_stop_each_kind_of_client() -> None:
    message = in_use_message(
        "the private PostgreSQL at /h",
        [
            Client("enrich run (pid 42)", 3),
            Client("enrich dev workers", 2),
            Client("enrich-relay", 1),
            Client("", 1),
        ],
    )
    assert message.startswith(
        "the private PostgreSQL at /h is in use by enrich run (pid 42) (3 connections), "
        "enrich dev workers (2 connections), enrich-relay, a client without an application name: "
        "stop them first (Ctrl-C where it runs, or `kill 42`; `enrich dev down` for the enrich "
        "dev parts; close the other sessions), or stop it anyway with `enrich db down --force`"
    ), message


def test_enrich_dev_parts_name_their_connections(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    argv = [sys.executable, "-c", "import os; print('name=' + os.environ['PGAPPNAME'])"]
    start_process(layout, "workers", argv, {"PATH": os.environ["PATH"]}).wait(30)
    assert "name=enrich dev workers" in layout.log_file("workers").read_text()


def test_dev_down_all_leaves_the_cluster_to_other_clients(cluster: Cluster) -> None:
    with psycopg.connect(cluster.dsn, autocommit=True, application_name="psql"):
        refused = enrich(cluster, "dev", "down", "--all", "--home", str(cluster.home))
        assert refused.returncode == 1
        assert "is in use by psql" in refused.stderr, refused.stderr
        assert cluster.pg.status().running
    stopped = enrich(cluster, "dev", "down", "--all", "--home", str(cluster.home))
    assert stopped.returncode == 0, stopped.stderr
    assert not cluster.pg.status().running
