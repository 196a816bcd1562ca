"""Names and headers from users are printed as typed: no Rich markup, no terminal controls."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.cli.text import visible
from tests.test_cli_batch import db, enrich  # noqa: F401  (db is a fixture)

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


def test_a_name_and_headers_are_printed_as_typed(db: str, tmp_path: Path) -> None:  # noqa: F811
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
