"""Imports that catch a user's mistakes before anything is written (issue 10, items 1-3).

Each class of mistake: a file without a header row, columns that feed none of the chosen steps
(a wrong delimiter included), and what Python used to say in its own words (mixed line endings,
NULs, ``-`` for stdin, an unclosed quote swallowing lines). Through ``import_csv`` and through the
CLI (click's CliRunner), on a real test database.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from psycopg.types.json import Jsonb

from shared.cli.main import main
from shared.errors import InvalidInput
from shared.importer import (
    MalformedCsv,
    RegisteredStep,
    data_in_header,
    import_csv,
    suggest_columns,
    unfed_steps,
)
from shared.steps import HANDLERS, INPUTS
from tests.test_cli_batch import table_counts
from tests.test_importer import counts, items, write

Conn = psycopg.AsyncConnection[Any]

NO_HEADER = "Acme Inc,acme.com\nGlobex,globex.com\nInitech,initech.com\n"


# 1. A file without a header row -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cell", "kind"),
    [
        (NO_HEADER, "acme.com", "a domain name"),
        ("Acme,https://acme.com/\nGlobex,https://globex.com\n", "https://acme.com/", "a web"),
        ("Jane Doe,jane@acme.com\nJohn Roe,john@globex.com\n", "jane@acme.com", "an email"),
        ("Acme,www.acme.com\n", "www.acme.com", "a web address"),
        ("1,Acme\n2,Globex\n3,Initech\n", "1", "a number"),
        ("Acme;acme.com;120\nGlobex;globex.com;45\n", "acme.com", "a domain name"),
    ],
)
async def test_a_first_row_of_data_is_refused_with_nothing_written(
    conn: Conn, tmp_path: Path, text: str, cell: str, kind: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        await import_csv(conn, write(tmp_path, text), "step_a")
    message = str(refused.value)
    assert message.startswith("in.csv: line 1 looks like data, not a header row")
    assert f"{cell!r}" in message and kind in message
    assert "--no-header --columns" in message
    assert await counts(conn) == (0, 0, 0)


@pytest.mark.parametrize(
    "text",
    [
        # Flattened exports: a dotted header is no domain when the values under it are names.
        "company.name,company.website\nAcme Inc,acme.com\nGlobex,globex.com\n",
        # Year columns beside a well-known column name are a header.
        "Company,2022,2023\nAcme,10,12\nGlobex,7,9\n",
        "Name,Website,Employees\nAcme,acme.com,120\n",
    ],
)
async def test_real_headers_that_look_a_little_like_data_are_kept(
    conn: Conn, tmp_path: Path, text: str
) -> None:
    """Only the header tells these apart from data: with it they import, without it not."""
    report = await import_csv(conn, write(tmp_path, text), "step_a")
    assert report.rows_imported == text.count("\n") - 1
    rows_only = text.split("\n", 1)[1]
    with pytest.raises(InvalidInput, match="line 1 looks like data"):
        await import_csv(conn, write(tmp_path, rows_only), "step_a")


def test_suggested_columns_follow_the_first_row() -> None:
    assert suggest_columns(["Acme Inc", "acme.com"]) == ["name", "website"]
    assert suggest_columns(["Acme", "jane@acme.com", "x.io", "12"]) == [
        "name",
        "email",
        "website",
        "column_4",
    ]
    assert data_in_header([["Website", "Name"], ["acme.com", "Acme"]]) is None


async def test_no_header_with_columns_imports_the_first_row_too(conn: Conn, tmp_path: Path) -> None:
    path = write(tmp_path, NO_HEADER)
    report = await import_csv(conn, path, "normalize_domain", columns="name,website")
    assert report.rows_imported == 3
    assert await items(conn, report.batch_id) == [
        {"name": "Acme Inc", "website": "acme.com"},
        {"name": "Globex", "website": "globex.com"},
        {"name": "Initech", "website": "initech.com"},
    ]
    cur = await conn.execute(
        "select meta -> 'source' from batches where id = %s", (report.batch_id,)
    )
    row = await cur.fetchone()
    assert row is not None and row[0]["header_row"] is False


async def test_no_header_refuses_a_header_row_and_a_wrong_column_count(
    conn: Conn, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInput, match="line 1 looks like a header row"):
        await import_csv(
            conn,
            write(tmp_path, "Company Name,Website\nAcme,acme.com\n"),
            "step_a",
            columns="name,website",
        )
    with pytest.raises(
        InvalidInput, match=r"--columns names 1 column\(s\) \(name\), but line 1 has 2"
    ):
        await import_csv(conn, write(tmp_path, NO_HEADER), "step_a", columns="name")
    assert await counts(conn) == (0, 0, 0)


# 2. No column feeds the chosen steps --------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "steps", "unfed", "needs"),
    [
        ("foo,bar,baz", "normalize_domain", "normalize_domain", "a website, domain or email"),
        ("Website,Country", "clean_company_name", "clean_company_name", "a company name column"),
        # exa_verify cannot search without a domain: a name alone fails every item.
        ("Company Name,Country", "exa_verify", "exa_verify", "or normalize_domain before it"),
        ("Notes,Country", "clay_enrich", "clay_enrich", "LinkedIn column"),
        ("Notes", "step_a,normalize_domain,clean_company_name", "normalize_domain, clean", "name"),
    ],
)
async def test_steps_no_column_feeds_are_refused_before_writing(
    conn: Conn, tmp_path: Path, header: str, steps: str, unfed: str, needs: str
) -> None:
    path = write(tmp_path, f"{header}\n" + ",".join(["x"] * (header.count(",") + 1)) + "\n")
    with pytest.raises(InvalidInput) as refused:
        await import_csv(conn, path, steps)
    message = str(refused.value)
    assert message.startswith(f"in.csv: no column feeds {unfed}")
    assert needs in message
    shown = ", ".join(repr(h) for h in header.split(","))
    assert f"the header (line 1) has {header.count(',') + 1} column(s): {shown}" in message
    assert await counts(conn) == (0, 0, 0)


@pytest.mark.parametrize(
    ("header", "steps"),
    [
        ("Company Website,Notes", "normalize_domain"),  # an alias of website
        ("Work Email", "normalize_domain,exa_verify"),  # exa_verify reads normalize_domain's
        ("Company,LinkedIn", "clay_enrich"),
        ("LinkedIn URL", "clay_enrich"),
    ],
)
async def test_a_column_that_feeds_each_step_is_enough(
    conn: Conn, tmp_path: Path, header: str, steps: str
) -> None:
    """With these columns the steps are fed; with the same columns renamed, refused."""
    width = header.count(",") + 1
    values = ",".join(["Acme"] * width)
    report = await import_csv(conn, write(tmp_path, f"{header}\n{values}\n"), steps)
    assert report.rows_imported == 1
    renamed = ",".join(f"other_{i}" for i in range(width))
    with pytest.raises(InvalidInput, match="no column feeds"):
        await import_csv(conn, write(tmp_path, f"{renamed}\n{values}\n"), steps)


async def test_the_registry_config_says_which_fields_a_step_reads(
    conn: Conn, tmp_path: Path
) -> None:
    await conn.execute(
        "update enrichment_registry set config = config || %s where step_name = 'normalize_domain'",
        (Jsonb({"source_fields": ["site_link"]}),),
    )
    path = write(tmp_path, "Website\nacme.com\n")
    with pytest.raises(InvalidInput, match=r"any of: site_link\)"):
        await import_csv(conn, path, "normalize_domain")
    report = await import_csv(conn, write(tmp_path, "Site Link\nacme.com\n"), "normalize_domain")
    assert report.rows_imported == 1


async def test_a_wrong_delimiter_is_caught_by_the_same_check(conn: Conn, tmp_path: Path) -> None:
    path = write(tmp_path, "name;website\nAcme;acme.com\n")
    with pytest.raises(InvalidInput) as refused:
        await import_csv(conn, path, "normalize_domain", delimiter=",")
    message = str(refused.value)
    assert "no column feeds normalize_domain" in message
    assert "'name;website'" in message and "--delimiter semicolon" in message
    assert await counts(conn) == (0, 0, 0)


def test_every_handler_that_reads_the_item_declares_its_inputs() -> None:
    """A new step that reads raw_data gets an INPUTS entry, or the import cannot check it."""
    reads_nothing = {"step_a", "step_b", "noop", "step_async"}
    assert set(HANDLERS) - reads_nothing == set(INPUTS)


def test_an_earlier_step_counts_only_when_the_config_needs_it() -> None:
    registry = {
        "normalize_domain": RegisteredStep("normalize_domain", {}),
        "exa_verify": RegisteredStep("exa_verify", {"needs": []}),
    }
    unfed = unfed_steps(["normalize_domain", "exa_verify"], registry, ["domain_name_x"])
    assert [step for step, _ in unfed] == ["normalize_domain", "exa_verify"]
    registry["exa_verify"] = RegisteredStep("exa_verify", {"needs": ["normalize_domain"]})
    unfed = unfed_steps(["exa_verify", "normalize_domain"], registry, ["website"])
    assert unfed == []  # the column feeds both
    unfed = unfed_steps(["normalize_domain", "exa_verify"], registry, ["email"])
    assert unfed == []


# 3. Messages in the user's terms ------------------------------------------------------------------


async def test_mixed_line_endings_are_read_as_lines(conn: Conn, tmp_path: Path) -> None:
    text = (
        'name,website\r\nAcme,acme.com\nGlobex,globex.com\rInitech,"ini\rtech.com"\r\nHooli,x,y\r'
    )
    report = await import_csv(conn, write(tmp_path, text), "step_a", skip_invalid=True)
    assert await items(conn, report.batch_id) == [
        {"name": "Acme", "website": "acme.com"},
        {"name": "Globex", "website": "globex.com"},
        {"name": "Initech", "website": "ini\rtech.com"},
    ]
    # Line numbers count every kind of line end, as an editor does.
    assert [str(b) for b in report.skipped] == ["line 6: 3 field(s), more than the header's 2"]


async def test_nul_characters_are_removed_and_counted(conn: Conn, tmp_path: Path) -> None:
    path = write(tmp_path, b"na\x00me,website\nAc\x00me,acme.com\nGlobex,glo\x00bex.com\x00\n")
    report = await import_csv(conn, path, "normalize_domain")
    assert await items(conn, report.batch_id) == [
        {"name": "Acme", "website": "acme.com"},
        {"name": "Globex", "website": "globex.com"},
    ]
    (warning,) = [w for w in report.warnings if "NUL" in w]
    assert "removed 4 NUL character(s)" in warning and "line(s) 1, 2, 3" in warning


@pytest.mark.parametrize(
    ("data", "said"),
    [
        ("name,website\nAcme,acme.com\n".encode("utf-16-le"), "not text"),
        (b"PK\x03\x04\x14\x00\x06\x00", "an Excel workbook (.xlsx)"),
        (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Excel workbook (.xls)"),
        (b"\x1f\x8b\x08\x00", "gzip-compressed"),
    ],
)
async def test_files_that_are_not_text_are_named_for_what_they_are(
    conn: Conn, tmp_path: Path, data: bytes, said: str
) -> None:
    with pytest.raises(InvalidInput) as refused:
        await import_csv(conn, write(tmp_path, data), "step_a")
    assert str(refused.value).startswith("in.csv: the file is ")
    assert said in str(refused.value)
    assert await counts(conn) == (0, 0, 0)


async def test_dash_reads_standard_input(conn: Conn, monkeypatch: pytest.MonkeyPatch) -> None:
    body = "name,website\n" + "".join(f"Co {i},co{i}.com\n" for i in range(5000))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(body.encode())))
    report = await import_csv(conn, "-", "normalize_domain")
    assert report.rows_imported == 5000  # more than the sniffed head: the rest streams on
    rows = await items(conn, report.batch_id)
    assert rows[0] == {"name": "Co 0", "website": "co0.com"}
    assert rows[-1] == {"name": "Co 4999", "website": "co4999.com"}
    cur = await conn.execute("select meta -> 'source' ->> 'file' from batches")
    assert await cur.fetchone() == ("stdin",)


async def test_lines_swallowed_by_an_unclosed_quote_are_counted(conn: Conn, tmp_path: Path) -> None:
    text = 'name,website\nAcme,acme.com\n"Globex,globex.com\n' + "".join(
        f"Co {i},co{i}.com\n" for i in range(40)
    )
    with pytest.raises(MalformedCsv, match=r"1 malformed row\(s\) on 41 lines"):
        await import_csv(conn, write(tmp_path, text), "step_a")
    report = await import_csv(conn, write(tmp_path, text), "step_a", skip_invalid=True)
    assert (report.rows_imported, report.rows_skipped, report.lines_skipped) == (1, 1, 41)
    assert str(report.skipped[0]).startswith("lines 3-43 (41 lines): a quoted value")


async def test_rows_merged_by_a_quote_that_closes_later_are_warned_about(
    conn: Conn, tmp_path: Path
) -> None:
    text = (
        'name,website\n"Acme,acme.com\nGlobex,globex.com\nInitech",initech.com\nHooli,hooli.com\n'
    )
    report = await import_csv(conn, write(tmp_path, text), "step_a")
    assert report.rows_imported == 2
    (warning,) = [w for w in report.warnings if "unclosed quote" in w]
    assert "starting on line(s) 2" in warning
    # A quoted address over two lines is no such thing.
    fine = 'name,address\nAcme,"1 Main St\nSpringfield"\n'
    assert not any(
        "unclosed" in w for w in (await import_csv(conn, write(tmp_path, fine), "step_a")).warnings
    )


# The CLI ------------------------------------------------------------------------------------------


def enrich(*args: str, stdin: bytes | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=stdin, catch_exceptions=False)


@pytest.mark.parametrize("command", ["batch create", "run"])
def test_cli_refuses_a_header_less_file_then_imports_it_with_no_header(
    db: str, tmp_path: Path, command: str
) -> None:
    path = write(tmp_path, NO_HEADER, "companies.csv")
    refused = enrich(*command.split(), str(path), "--steps", "normalize_domain")
    assert refused.exit_code == 2
    assert "companies.csv: line 1 looks like data" in refused.stderr
    assert "--no-header --columns name,website" in refused.stderr
    assert "Traceback" not in refused.output
    assert table_counts(db) == (0, 0, 0)
    done = enrich(
        *command.split(),
        str(path),
        "--steps",
        "normalize_domain",
        "--no-header",
        "--columns",
        "name,website",
    )
    assert done.exit_code == 0, done.stderr
    assert "imported 3 row(s)" in done.stderr
    assert table_counts(db)[1] == 3


def test_cli_no_header_and_columns_go_together(db: str, tmp_path: Path) -> None:
    path = write(tmp_path, NO_HEADER)
    alone = enrich("batch", "create", str(path), "--steps", "step_a", "--no-header")
    assert alone.exit_code == 2 and "--no-header needs --columns" in alone.stderr
    columns = enrich("batch", "create", str(path), "--steps", "step_a", "--columns", "a,b")
    assert columns.exit_code == 2 and "add --no-header" in columns.stderr


def test_cli_refuses_columns_that_feed_no_step(db: str, tmp_path: Path) -> None:
    path = write(tmp_path, "foo,bar,baz\n1,2,3\n")
    result = enrich("batch", "create", str(path), "--steps", "normalize_domain")
    assert result.exit_code == 2
    assert "in.csv: no column feeds normalize_domain" in result.stderr
    assert "'foo', 'bar', 'baz'" in result.stderr
    assert table_counts(db) == (0, 0, 0)


def test_cli_run_takes_a_delimiter(db: str, tmp_path: Path) -> None:
    path = write(tmp_path, "name;website\nAcme;acme.com\n")
    wrong = enrich("run", str(path), "--steps", "normalize_domain", "--delimiter", "comma")
    assert wrong.exit_code == 2
    assert "--delimiter semicolon" in wrong.stderr
    assert table_counts(db) == (0, 0, 0)
    right = enrich("run", str(path), "--steps", "normalize_domain", "--delimiter", "semicolon")
    assert right.exit_code == 0, right.stderr
    assert "delimiter: semicolon" in right.stderr


@pytest.mark.parametrize("command", ["batch create", "run"])
def test_cli_dash_reads_the_csv_from_stdin(db: str, command: str) -> None:
    body = b"Company Name,Website\nAcme,acme.com\nGlobex,globex.com\n"
    result = enrich(*command.split(), "-", "--steps", "normalize_domain", stdin=body)
    assert result.exit_code == 0, result.stderr
    assert "imported 2 row(s)" in result.stderr
    assert "stdin (delimiter: comma)" in result.stderr
    with psycopg.connect(db) as conn:
        row = conn.execute("select name, item_count from batches").fetchone()
    assert row == ("stdin", 2)


def test_cli_messages_carry_no_python_wording(db: str, tmp_path: Path) -> None:
    mixed = write(tmp_path, "name,website\r\nAcme,acme.com\nGlobex,globex.com\rX,x.com\n", "m.csv")
    result = enrich("batch", "create", str(mixed), "--steps", "normalize_domain")
    assert result.exit_code == 0, result.stderr
    assert "imported 3 row(s), 0 skipped" in result.stderr
    assert "universal-newline" not in result.output
    nul = write(tmp_path, b"na\x00me,website\nAcme,acme.com\n", "n.csv")
    result = enrich("batch", "create", str(nul), "--steps", "normalize_domain")
    assert result.exit_code == 0, result.stderr
    assert "removed 1 NUL character(s)" in result.stderr
    assert "Unicode escape" not in result.output


def test_cli_skip_invalid_counts_the_lines_an_unclosed_quote_swallowed(
    db: str, tmp_path: Path
) -> None:
    text = 'name,website\nAcme,acme.com\n"Globex,globex.com\n' + "".join(
        f"Co {i},co{i}.com\n" for i in range(9)
    )
    result = enrich(
        "batch", "create", str(write(tmp_path, text)), "--steps", "step_a", "--skip-invalid"
    )
    assert result.exit_code == 0, result.stderr
    assert "imported 1 row(s), 1 skipped on 10 lines" in result.stderr
    assert "lines 3-12 (10 lines): a quoted value is never closed" in result.stderr
