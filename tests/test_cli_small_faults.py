"""Small faults of the command line (issue 11, item 8), each against a real PostgreSQL.

- Ctrl-C (SIGINT) during a CSV import exits 130 with one line saying what was written.
- The private cluster's socket directory removed while the server runs: ``enrich db status``
  says the server cannot be reached, ``enrich db up`` restarts it, other commands say to.
- ``enrich export`` (and ``retry`` / ``cancel``) give the documented exit code for each failure:
  2 when the command line cannot work as given, 1 for an unknown batch or a database problem.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import psycopg
import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from shared.cli.main import main
from shared.db.embedded import EmbeddedPostgres
from shared.settings import Settings, get_settings
from tests.conftest import wait_for

# Enough rows that the COPY runs for a good while on a slow machine, few enough to write quickly.
BIG_ROWS = 400_000


@pytest.fixture
def db(dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Point the CLI at this test's database."""
    monkeypatch.setenv("DATABASE_URL", dsn)
    get_settings.cache_clear()
    yield dsn
    get_settings.cache_clear()


@pytest.fixture(scope="module")
def big_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "companies.csv"
    with path.open("w", encoding="utf-8") as out:
        out.write("name,website,city\n")
        out.writelines(f"Company {i},company{i}.com,City {i % 97}\n" for i in range(BIG_ROWS))
    return path


def enrich(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def counts(dsn: str) -> tuple[int, int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "select (select count(*) from batches), (select count(*) from batch_items),"
            " (select count(*) from workflow_states)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def copying(dsn: str) -> int:
    """Backends of this database running the import's COPY."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and state = 'active' and query ilike 'copy public.batch_items%%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def others(dsn: str) -> int:
    """Other backends connected to this database (the CLI's, while it lives)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and pid <> pg_backend_pid()"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _sigint_as_on_a_terminal() -> None:
    # A child of a shell's background job inherits SIGINT ignored; a terminal's Ctrl-C is not.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def enrich_process(dsn: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shared.cli.main", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "DATABASE_URL": dsn},
        preexec_fn=_sigint_as_on_a_terminal,
    )


def interrupt_the_import(
    dsn: str, proc: subprocess.Popen[str], signals: list[signal.Signals]
) -> tuple[str, str]:
    """Wait until the COPY runs, send ``signals`` at once, return (stdout, stderr) of the exit."""
    try:
        wait_for(lambda: proc.poll() is not None or copying(dsn) > 0, timeout=60)
        assert proc.poll() is None, "the import finished before it could be interrupted"
        for sig in signals:
            proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return out, err


# Ctrl-C during the import ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "signals"),
    [
        (["batch", "create"], [signal.SIGINT]),
        (["run"], [signal.SIGINT]),
        (["batch", "create"], [signal.SIGTERM]),
        (["run"], [signal.SIGINT, signal.SIGINT]),  # the second one forces the exit
    ],
    ids=["batch-create", "run", "sigterm", "twice"],
)
def test_a_stop_signal_during_the_import_exits_130_and_writes_nothing(
    db: str, big_csv: Path, command: list[str], signals: list[signal.Signals]
) -> None:
    proc = enrich_process(db, *command, str(big_csv), "--steps", "step_a")

    out, err = interrupt_the_import(db, proc, signals)

    assert proc.returncode == 130, err
    assert err.strip().splitlines() == ["interrupted: nothing was imported"]
    assert out == ""
    wait_for(lambda: others(db) == 0)  # the server let go of the connection, still copying
    assert counts(db) == (0, 0, 0)


async def test_a_signal_once_the_rows_are_in_lets_the_commit_finish_and_says_so(
    dsn: str, big_csv: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Ctrl-C right after the last row, as the commit starts: the batch exists and we say so."""
    from shared.cli import batch_commands
    from shared.importer import ImportReport

    small = tmp_path / "small.csv"
    small.write_text("name,website\nAcme,acme.com\nBeta,beta.io\n", encoding="utf-8")
    real_import = batch_commands.import_csv

    async def import_then_signal(*args: object, **kwargs: object) -> ImportReport:
        report = await real_import(*args, **kwargs)  # type: ignore[arg-type]
        signal.raise_signal(signal.SIGINT)
        return report

    monkeypatch.setattr(batch_commands, "import_csv", import_then_signal)
    screen = Console(file=io.StringIO())
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    with pytest.raises(batch_commands.ImportInterrupted) as caught:
        await batch_commands.import_with_progress(
            screen, dsn, small, "step_a", client_id=None, name="small", skip_invalid=False
        )

    batch_id = caught.value.batch_id
    assert isinstance(batch_id, UUID)
    assert str(caught.value) == (
        f"interrupted after the import committed: batch {batch_id} holds 2 item(s); "
        f"run it with: enrich run --batch {batch_id}"
    )
    assert counts(dsn) == (1, 2, 2)
    # The previous handlers are back, and the signal left no cancellation behind.
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    task = asyncio.current_task()
    assert task is not None and not task.cancelling()


# The private cluster loses its socket directory ---------------------------------------------------


@pytest.fixture
def private_home(short_home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The CLI on its own private cluster under ``short_home`` (no DATABASE_URL)."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    monkeypatch.setenv("ENRICH_HOME", str(short_home))
    get_settings.cache_clear()
    yield short_home
    get_settings.cache_clear()


def test_a_lost_socket_directory_is_reported_and_db_up_repairs_it(private_home: Path) -> None:
    cluster = EmbeddedPostgres(home=private_home, settings=Settings(enrich_home=private_home))
    up = enrich("db", "up")
    assert up.exit_code == 0, up.output
    before = cluster.status()
    assert before.running
    with psycopg.connect(cluster.dsn, autocommit=True) as conn:
        conn.execute("create table kept (x int)")
        conn.execute("insert into kept values (42)")
    socket_dir = private_home / "pg" / "run"
    shutil.rmtree(socket_dir)

    status = enrich("db", "status")
    assert status.exit_code == 1
    assert f"private cluster: running (pid {before.pid}), unreachable" in status.stdout
    assert f"its socket directory {socket_dir} is gone" in status.stderr
    assert "`enrich db up` restarts it" in status.stderr
    assert "Traceback" not in status.output
    assert not cluster.status().reachable

    listed = enrich("batch", "list")  # any other command: the advice, no restart behind our back
    assert listed.exit_code == 1
    assert "cannot be reached" in listed.stderr and "`enrich db up`" in listed.stderr
    assert cluster.status().pid == before.pid

    repaired = enrich("db", "up")
    assert repaired.exit_code == 0, repaired.output
    assert "private cluster restarted: its socket" in repaired.stdout
    after = cluster.status()
    assert after.reachable and after.pid != before.pid
    mode = socket_dir.stat()
    assert oct(mode.st_mode & 0o777) == "0o700"
    assert mode.st_uid == (private_home / "pg" / "data").stat().st_uid
    with psycopg.connect(cluster.dsn) as conn:
        assert conn.execute("select x from kept").fetchone() == (42,)
    status = enrich("db", "status")
    assert status.exit_code == 0, status.output
    assert f"private cluster: running (pid {after.pid})\n" in status.stdout
    assert "none pending" in status.stdout
    again = enrich("db", "up")
    assert again.exit_code == 0 and "restarted" not in again.stdout
    assert cluster.status().pid == after.pid


def test_a_lost_socket_file_refuses_a_plain_start_and_repair_restarts(short_home: Path) -> None:
    from shared.errors import EmbeddedPostgresError

    cluster = EmbeddedPostgres(home=short_home, settings=Settings(enrich_home=short_home))
    cluster.start()
    pid = cluster.status().pid
    socket = short_home / "pg" / "run" / ".s.PGSQL.5432"
    socket.unlink()

    assert cluster.status().problem == f"its socket {socket} is gone"
    with pytest.raises(EmbeddedPostgresError, match="cannot be reached: its socket"):
        cluster.start()
    assert cluster.status().pid == pid and cluster.restarted_because is None

    assert cluster.start(repair=True) == cluster.dsn
    assert cluster.restarted_because == f"its socket {socket} is gone"
    st = cluster.status()
    assert st.reachable and st.pid != pid
    with psycopg.connect(cluster.dsn) as conn:
        assert conn.execute("select current_database()").fetchone() == ("enrich",)
