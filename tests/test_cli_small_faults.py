"""Small faults of the command line (issue 11, item 8), each against a real PostgreSQL.

- Ctrl-C (SIGINT) during a CSV import exits 130 with one line saying what was written.
- ``enrich export`` (and ``retry`` / ``cancel``) give the documented exit code for each failure:
  2 when the command line cannot work as given, 1 for an unknown batch or a database problem.

The embedded cluster's lost socket directory is tested in ``tests/test_embedded.py``.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import psycopg
import pytest
from rich.console import Console

from shared.settings import get_settings
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
