"""Names and headers from users are printed as typed: no Rich markup, no terminal controls."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from uuid import UUID

import pytest

from shared.cli.batch_commands import _stderr, _stdout
from shared.cli.logs import configure_cli_logging
from shared.cli.text import visible
from shared.pg_state import PgStateAPI
from shared.state_api import StepFailure
from tests.test_cli_batch import enrich

ESCAPE = "\x1b[2J"  # clears the screen when printed raw


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("Acme", "Acme"),
        ("[red]x", "[red]x"),
        ("a\x1b[2Jb", "a\\x1b[2Jb"),
        ("bell\x07", "bell\\x07"),
        ("rtl\u202eevil", "rtl\\u202eevil"),
        ("São Paulo", "São Paulo"),
    ],
)
def test_visible(raw: str, shown: str) -> None:
    assert visible(raw) == shown


def test_a_name_and_headers_are_printed_as_typed(db: str, tmp_path: Path) -> None:
    path = tmp_path / "[red]file.csv"
    path.write_text("[bold]Company Name,Website\nAcme,acme.com\n", encoding="utf-8")
    created = enrich(
        "batch", "create", str(path), "--steps", "normalize_domain", "--name", f"x{ESCAPE}y[bold]z"
    )
    assert created.exit_code == 0, created.output
    assert "[red]file.csv" in created.output  # the file's name, brackets kept
    assert "[bold]Company Name" in created.output  # the header as in the file

    listed = enrich("batch", "list")
    assert listed.exit_code == 0, listed.output
    assert ESCAPE not in listed.output
    assert "x\\x1b[2Jy[bold]z" in listed.output


def _fail_every_row(dsn: str, batch_id: UUID, error: str) -> None:
    async def go() -> None:
        async with await PgStateAPI.open(dsn, max_size=1) as api:
            claimed = [c.task for c in await api.claim(100, batch_ids=[batch_id])]
            await api.start(claimed)
            await api.fail([StepFailure(t, error, retryable=False) for t in claimed])

    asyncio.run(go())


def test_step_errors_in_the_run_summary_are_printed_as_typed(
    db: str,
    tmp_path: Path,
) -> None:
    # A provider's error text is not markup: "[/x]" made Rich raise MarkupError (a traceback).
    path = tmp_path / "companies.csv"
    path.write_text("name,website\nAcme,acme.com\n", encoding="utf-8")
    created = enrich("batch", "create", str(path), "--steps", "normalize_domain")
    assert created.exit_code == 0, created.output
    batch_id = UUID(created.stdout.strip().splitlines()[-1])
    _fail_every_row(db, batch_id, f"HTTP 502 [/x] [red]{ESCAPE}")

    resumed = enrich("run", "--batch", str(batch_id))

    assert resumed.exit_code == 3, resumed.output
    assert "HTTP 502 [/x] [red]\\x1b[2J" in resumed.output
    assert ESCAPE not in resumed.output


def test_retry_of_a_step_shows_its_name_as_typed(db: str, tmp_path: Path) -> None:
    path = tmp_path / "companies.csv"
    path.write_text("name,website\nAcme,acme.com\n", encoding="utf-8")
    created = enrich("batch", "create", str(path), "--steps", "normalize_domain")
    batch_id = created.stdout.strip().splitlines()[-1]

    retried = enrich("retry", batch_id, "--step", f"[/x]{ESCAPE}")

    assert retried.exit_code == 2, retried.output  # not a step of the batch
    assert "[/x]\\x1b[2J" in retried.output
    assert ESCAPE not in retried.output


def test_an_error_naming_a_file_shows_the_name_as_typed(
    db: str,
    tmp_path: Path,
) -> None:
    path = tmp_path / f"bad{ESCAPE}[red].csv"
    path.write_text("", encoding="utf-8")  # empty: refused with a message naming the file

    created = enrich("batch", "create", str(path), "--steps", "normalize_domain")

    assert created.exit_code == 2, created.output
    assert "\\x1b[2J[red].csv" in created.output
    assert ESCAPE not in created.output


def test_log_lines_show_controls_as_typed(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    earlier = [h for h in root.handlers if h.get_name() == "enrich-cli"]  # an earlier CLI call's
    for handler in earlier:
        root.removeHandler(handler)
    configure_cli_logging("INFO")  # on this test's (captured) stderr
    try:
        logging.getLogger("enrich.test").warning("step failed: %s", f"bad{ESCAPE}")
    finally:
        for handler in [h for h in root.handlers if h.get_name() == "enrich-cli"]:
            root.removeHandler(handler)
        for handler in earlier:
            root.addHandler(handler)

    err = capsys.readouterr().err
    assert "warning: step failed: bad\\x1b[2J" in err
    assert ESCAPE not in err


def test_the_cli_consoles_print_strings_as_typed(capsys: pytest.CaptureFixture[str]) -> None:
    # Whatever a future message embeds, a plain string is never Rich markup.
    _stderr().print("step_a: HTTP 502 [/x] [red]boom")
    _stdout().print("[bold]name")

    captured = capsys.readouterr()
    assert "step_a: HTTP 502 [/x] [red]boom" in captured.err
    assert "[bold]name" in captured.out
