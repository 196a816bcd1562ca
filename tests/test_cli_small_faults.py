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
import re
import shutil
import signal
import stat
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


# Exit codes of export -----------------------------------------------------------------------------

MISSING = "00000000-0000-4000-8000-00000000dead"
EXPORT_CSV = "name,website,item_id,step_a: status,step_a: error\nAcme,acme.com,ID,pending,\n"


def ids_hidden(text: str) -> str:
    """An export with its item ids written as ID."""
    return re.sub(r"[0-9a-f]{8}(?:-[0-9a-f]{4}){3}-[0-9a-f]{12}", "ID", text)


@pytest.fixture
def small_batch(db: str, tmp_path: Path) -> str:
    source = tmp_path / "in.csv"
    source.write_text("name,website\nAcme,acme.com\n", encoding="utf-8")
    created = enrich("batch", "create", str(source), "--steps", "step_a")
    assert created.exit_code == 0, created.stderr
    source.unlink()
    return created.stdout.strip().splitlines()[-1]


def test_export_refuses_an_output_it_cannot_create_with_2_and_nothing_done(
    small_batch: str, tmp_path: Path
) -> None:
    """Whatever stops the output being created is bad input, found before the database is asked
    (an unknown batch does not hide it): 2, and nothing written anywhere."""
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() == 0:
        unwritable = Path("/proc")  # root may write anywhere os.access looks, but not there
    else:
        unwritable = tmp_path / "read-only"
        unwritable.mkdir(mode=0o500)
    cases = {
        str(out / "nope" / "x.csv"): "no such directory",
        str(unwritable / "x.csv"): "cannot write",
        str(out / ("a" * 300 + ".csv")): "File name too long",
    }
    for target, reason in cases.items():
        for batch_id in (small_batch, MISSING):
            result = enrich("export", batch_id, "-o", target)
            assert result.exit_code == 2, (target, result.stderr)
            assert result.stderr.startswith(f"error: cannot write {target}: "), result.stderr
            assert reason in result.stderr
            assert "Traceback" not in result.stderr and "EnrichError" not in result.stderr
    assert list(out.iterdir()) == []
    assert not list(unwritable.glob(".x.csv.*"))


def test_export_writes_a_long_but_valid_file_name(small_batch: str, tmp_path: Path) -> None:
    """Its temporary name (a dot, a suffix) must not be what is too long."""
    target = tmp_path / ("b" * 250 + ".csv")
    result = enrich("export", small_batch, "-o", str(target))
    assert result.exit_code == 0, result.stderr
    assert ids_hidden(target.read_text(encoding="utf-8")) == EXPORT_CSV
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_export_fails_with_1_when_writing_fails_once_it_runs(db: str, small_batch: str) -> None:
    with open(os.devnull, "rb") as stdin, open("/dev/full", "wb") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "shared.cli.main", "export", small_batch, "-o", "-"],
            stdin=stdin,
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "DATABASE_URL": db},
            timeout=60,
        )
    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: cannot write stdout: No space left on device"


def test_export_writes_a_fifo_in_place(small_batch: str, tmp_path: Path) -> None:
    """A FIFO (or /dev/null, /dev/stdout) is written to, never replaced by a regular file."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = subprocess.Popen(["cat", str(fifo)], stdout=subprocess.PIPE, text=True)
    try:
        result = enrich("export", small_batch, "-o", str(fifo))
        assert result.exit_code == 0, result.stderr
        assert fifo.is_fifo()
        out, _ = reader.communicate(timeout=30)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.communicate()
    assert ids_hidden(out) == EXPORT_CSV
    assert [p.name for p in tmp_path.iterdir()] == ["pipe"]


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_export_to_a_device_writes_it_and_a_full_one_fails_with_1(
    small_batch: str, tmp_path: Path
) -> None:
    null = tmp_path / "null"
    full = tmp_path / "full"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # what /dev/null is
    os.mknod(full, 0o666 | stat.S_IFCHR, os.makedev(1, 7))  # what /dev/full is

    assert enrich("export", small_batch, "-o", str(null)).exit_code == 0
    failed = enrich("export", small_batch, "-o", str(full))

    assert failed.exit_code == 1
    assert failed.stderr.strip() == f"error: cannot write {full}: No space left on device"
    assert stat.S_ISCHR(null.stat().st_mode) and stat.S_ISCHR(full.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "null"]


def test_export_without_a_database_exits_1(
    small_batch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://postgres@/enrich?host={tmp_path}")
    get_settings.cache_clear()
    result = enrich("export", small_batch, "-o", str(tmp_path / "x.csv"))
    assert result.exit_code == 1
    assert result.stderr.startswith("error: DatabaseUnavailable: "), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_run_gives_database_errors_the_exit_code_of_their_translation() -> None:
    """An error the State API functions raise with SQLSTATE 22023 is a refused argument (2), one
    with P0002 an unknown thing (1), whichever layer let it through."""
    from shared.cli.batch_commands import _run
    from shared.errors import EnrichError

    def exit_code(exc: BaseException) -> object:
        async def raising() -> None:
            raise exc

        with pytest.raises(SystemExit) as stopped:
            _run(raising)
        return stopped.value.code

    assert exit_code(psycopg.errors.InvalidParameterValue("a refused argument")) == 2
    assert exit_code(psycopg.errors.NoDataFound("batch x not found")) == 1
    assert exit_code(psycopg.errors.UndefinedTable("no such table")) == 1
    assert exit_code(EnrichError("plain")) == 1
    assert exit_code(KeyboardInterrupt()) == 130


def test_ctrl_c_in_a_db_or_dev_command_exits_130_not_aborted() -> None:
    import click

    from shared.cli.errors import friendly_errors

    @click.command()
    @friendly_errors
    def waits() -> None:
        raise KeyboardInterrupt

    result = CliRunner().invoke(waits, [])
    assert result.exit_code == 130
    assert result.stderr == "interrupted\n"
    assert result.stdout == ""
