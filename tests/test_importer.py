"""shared.importer: header mapping, encodings, delimiters, malformed rows, and what gets written."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest

from shared.errors import InvalidInput
from shared.importer import (
    MAX_REPORTED_ERRORS,
    ImportProgress,
    MalformedCsv,
    import_csv,
    map_headers,
    normalise_header,
    parse_steps,
    sniff_delimiter,
)

Conn = psycopg.AsyncConnection[Any]


def write(tmp_path: Path, text: str | bytes, name: str = "in.csv") -> Path:
    path = tmp_path / name
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8", newline="")
    else:
        path.write_bytes(text)
    return path


async def counts(conn: Conn) -> tuple[int, int, int]:
    cur = await conn.execute(
        "select (select count(*) from batches), (select count(*) from batch_items),"
        " (select count(*) from workflow_states)"
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


async def items(conn: Conn, batch_id: UUID) -> list[dict[str, Any]]:
    cur = await conn.execute(
        "select raw_data from batch_items where batch_id = %s order by seq", (batch_id,)
    )
    return [row[0] for row in await cur.fetchall()]


# Headers (no database) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ("Company Name", "company_name"),
        ("Website URL", "website_url"),
        ("  LinkedIn URL ", "linkedin_url"),
        ("companyName", "company_name"),
        ("# Employees", "num_employees"),
        ("E-mail", "e_mail"),
        ("Société", "societe"),
        ("HQ Country", "hq_country"),
        ("\ufeffName", "name"),
    ],
)
def test_normalise_header(header: str, key: str) -> None:
    assert normalise_header(header) == key


def test_aliases_map_to_canonical_keys_and_the_rest_is_kept() -> None:
    headers = map_headers(
        [
            "Company Name",
            "Website URL",
            "Company Domain",
            "LinkedIn",
            "Work Email",
            "Country",
            "# Employees",
            "Funding Stage",
        ]
    )
    assert headers.keys == (
        "name",
        "website",
        "domain",
        "linkedin_url",
        "email",
        "country",
        "employees",
        "funding_stage",
    )
    assert headers.mapped == {
        "Company Name": "name",
        "Website URL": "website",
        "Company Domain": "domain",
        "LinkedIn": "linkedin_url",
        "Work Email": "email",
        "Country": "country",
        "# Employees": "employees",
    }
    assert headers.unmapped == {"Funding Stage": "funding_stage"}
    assert headers.warnings == ()


@pytest.mark.parametrize("alias", ["company", "company_name", "Account Name", "Organization"])
def test_name_aliases(alias: str) -> None:
    assert map_headers([alias]).keys == ("name",)


@pytest.mark.parametrize("alias", ["website", "Company Website", "url", "Homepage"])
def test_website_aliases(alias: str) -> None:
    assert map_headers([alias]).keys == ("website",)


def test_two_headers_for_one_field_the_exact_one_wins() -> None:
    headers = map_headers(["Company", "Name", "Website", "Company Website"])
    assert headers.keys == ("company", "name", "website", "company_website")
    assert headers.unmapped == {"Company": "company", "Company Website": "company_website"}
    assert len(headers.warnings) == 2
    assert "'Company' would also map to 'name'" in headers.warnings[0]


def test_two_aliases_for_one_field_the_first_wins() -> None:
    headers = map_headers(["Company Name", "Organization"])
    assert headers.keys == ("name", "organization")


def test_duplicate_headers_after_normalisation_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"duplicate column 'company_name'.*column 1.*column 3"):
        map_headers(["Company Name", "Website", "company_name"])


def test_empty_header_is_refused() -> None:
    with pytest.raises(InvalidInput, match=r"empty or unusable column name.*column 2"):
        map_headers(["Name", "  ", "Website"])
    with pytest.raises(InvalidInput, match=r"column 1 \('\?\?'\)"):
        map_headers(["??", "Website"])


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_sniff_delimiter(delimiter: str) -> None:
    lines = [
        delimiter.join(["Company Name", "Website", "Country"]) + "\n",
        delimiter.join(['"Acme, Inc."', "acme.com", "France"]) + "\n",
        delimiter.join(["Beta; Gamma", "beta.io", "Spain"]) + "\n",
    ]
    assert sniff_delimiter(lines) == delimiter


def test_parse_steps() -> None:
    assert parse_steps(" step_a, step_b ,") == ("step_a", "step_b")
    with pytest.raises(InvalidInput, match="no steps"):
        parse_steps(" , ")
    with pytest.raises(InvalidInput, match="more than once: step_a"):
        parse_steps(["step_a", "step_b", "step_a"])


# Imports ------------------------------------------------------------------------------------------


async def test_import_writes_batch_items_and_first_steps(conn: Conn, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "Company Name,Website,Funding Stage\r\n"
        '"  Acme, Inc.  ",www.acme.com/ ,\r\n'
        "\r\n"
        '"Beta ""B"" Labs",beta.io,Seed\r\n'
        ",,\r\n"
        '"Gamma\nGroup",gamma.co,\r\n',
    )
    report = await import_csv(conn, path, "step_a,step_b", name="demo")
    assert report.rows_imported == 3
    assert report.rows_skipped == 0
    assert report.blank_lines == 2
    assert report.delimiter == ","
    assert report.bom is False
    assert report.steps == ("step_a", "step_b")
    assert report.headers.mapped == {"Company Name": "name", "Website": "website"}
    assert report.headers.unmapped == {"Funding Stage": "funding_stage"}
    # Trimmed, empty values dropped, in file order.
    assert await items(conn, report.batch_id) == [
        {"name": "Acme, Inc.", "website": "www.acme.com/"},
        {"name": 'Beta "B" Labs', "website": "beta.io", "funding_stage": "Seed"},
        {"name": "Gamma\nGroup", "website": "gamma.co"},
    ]
    cur = await conn.execute(
        "select name, blueprint, item_count, status::text, meta -> 'source' from batches"
        " where id = %s",
        (report.batch_id,),
    )
    assert await cur.fetchone() == (
        "demo",
        ["step_a", "step_b"],
        3,
        "PENDING",
        {
            "file": "in.csv",
            "rows_imported": 3,
            "rows_skipped": 0,
            "delimiter": ",",
            "columns": {
                "Company Name": "name",
                "Website": "website",
                "Funding Stage": "funding_stage",
            },
            "keys": ["name", "website", "funding_stage"],
        },
    )
    cur = await conn.execute(
        "select step_name, status::text, count(*) from workflow_states where batch_id = %s"
        " group by 1, 2",
        (report.batch_id,),
    )
    assert await cur.fetchall() == [("step_a", "PENDING", 3)]


async def test_bom_is_stripped_and_semicolons_sniffed(conn: Conn, tmp_path: Path) -> None:
    path = write(tmp_path, codecs.BOM_UTF8 + "Company;Website\nÉcole Nova;école.fr\n".encode())
    report = await import_csv(conn, path, ["step_a"])
    assert report.bom is True
    assert report.delimiter == ";"
    assert report.headers.mapped == {"Company": "name", "Website": "website"}
    assert await items(conn, report.batch_id) == [{"name": "École Nova", "website": "école.fr"}]


@pytest.mark.parametrize(("delimiter", "name"), [("\t", "tab"), ("|", "pipe")])
async def test_tab_and_pipe_files(conn: Conn, tmp_path: Path, delimiter: str, name: str) -> None:
    path = write(tmp_path, f"name{delimiter}website\nAcme, Inc.{delimiter}acme.com\n")
    report = await import_csv(conn, path, "step_a")
    assert report.delimiter == delimiter
    assert await items(conn, report.batch_id) == [{"name": "Acme, Inc.", "website": "acme.com"}]


async def test_explicit_delimiter_overrides_sniffing(conn: Conn, tmp_path: Path) -> None:
    path = write(tmp_path, "name;website\nA;a.com\n")
    report = await import_csv(conn, path, "step_a", delimiter=",")
    assert report.headers.keys == ("name_website",)


async def test_malformed_rows_refuse_the_import(conn: Conn, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "name,website,country\n"
        "A,a.com,FR\n"  # line 2
        "B,b.com\n"  # line 3: fewer
        '"C\nC",c.com,DE\n'  # lines 4-5: fine
        "D,d.com,ES,extra\n"  # line 6: more
        "E,e.com,IT\n",
    )
    with pytest.raises(MalformedCsv) as caught:
        await import_csv(conn, path, "step_a")
    err = caught.value
    assert err.total == 2
    assert [(b.line, b.reason) for b in err.bad_rows] == [
        (3, "2 field(s), fewer than the header's 3"),
        (6, "4 field(s), more than the header's 3"),
    ]
    message = str(err)
    assert "2 malformed row(s); nothing was imported" in message
    assert "line 3: 2 field(s)" in message
    assert "line 6: 4 field(s)" in message
    assert await counts(conn) == (0, 0, 0)


async def test_refusal_lists_twenty_rows_and_the_total(conn: Conn, tmp_path: Path) -> None:
    body = "".join("X\n" if i % 2 else f"N{i},n{i}.com\n" for i in range(100))
    path = write(tmp_path, "name,website\n" + body)
    with pytest.raises(MalformedCsv) as caught:
        await import_csv(conn, path, "step_a")
    assert caught.value.total == 50
    assert len(caught.value.bad_rows) == MAX_REPORTED_ERRORS
    assert caught.value.bad_rows[0].line == 3
    assert "... and 30 more" in str(caught.value)
    assert await counts(conn) == (0, 0, 0)


async def test_skip_invalid_imports_the_good_rows(conn: Conn, tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'name,website\nA,a.com\nB\nC,c.com\nD,"d.com"x\nE,e.com,,\nF,f.com,x\n',
    )
    report = await import_csv(conn, path, "step_a", skip_invalid=True)
    assert report.rows_imported == 3
    assert report.rows_skipped == 3
    assert [b.line for b in report.skipped] == [3, 5, 7]
    assert "closing quote is followed by other characters" in report.skipped[1].reason
    assert any("empty fields beyond the last column" in w for w in report.warnings)
    assert [i["name"] for i in await items(conn, report.batch_id)] == ["A", "C", "E"]
    assert await counts(conn) == (1, 3, 3)


async def test_skip_invalid_with_no_valid_row_is_an_error(conn: Conn, tmp_path: Path) -> None:
    path = write(tmp_path, "name,website\nA\nB\n")
    with pytest.raises(InvalidInput, match="no valid rows: all 2 data row"):
        await import_csv(conn, path, "step_a", skip_invalid=True)
    assert await counts(conn) == (0, 0, 0)


async def test_unclosed_quote_is_reported_with_its_line(conn: Conn, tmp_path: Path) -> None:
    path = write(tmp_path, 'name,website\nA,a.com\nB,"b.com\nC,c.com\n')
    swallowed = r"lines 3-4 \(2 lines\): a quoted value is never closed"
    with pytest.raises(MalformedCsv, match=swallowed):
        await import_csv(conn, path, "step_a")
    assert await counts(conn) == (0, 0, 0)


async def test_invalid_utf8_names_the_line(conn: Conn, tmp_path: Path) -> None:
    path = write(tmp_path, b"name,website\nA,a.com\nB,b.com\nCaf\xe9 Nova,cafe.fr\n")
    with pytest.raises(InvalidInput, match=r"line 4 is not valid UTF-8 \(byte 0xe9"):
        await import_csv(conn, path, "step_a")
    assert await counts(conn) == (0, 0, 0)


async def test_utf16_is_refused(conn: Conn, tmp_path: Path) -> None:
    path = write(tmp_path, "name\nA\n".encode("utf-16"))
    with pytest.raises(InvalidInput, match="UTF-16"):
        await import_csv(conn, path, "step_a")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "the file is empty"),
        ("\n\n  \n", "no header row"),
        ("name,website\n", "header but no data rows"),
        ("name,website\n\n,\n\n", "header but no data rows"),
    ],
)
async def test_empty_files_are_errors(conn: Conn, tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        await import_csv(conn, write(tmp_path, text), "step_a")
    assert await counts(conn) == (0, 0, 0)


async def test_bad_header_is_refused(conn: Conn, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"in.csv: duplicate column 'website'"):
        await import_csv(conn, write(tmp_path, "Website,website\na.com,b.com\n"), "step_a")
    assert await counts(conn) == (0, 0, 0)


async def test_unknown_step_is_refused_before_writing(conn: Conn, tmp_path: Path) -> None:
    cur = await conn.execute(
        "select last_value from pg_sequences where sequencename = 'batch_items_seq_seq'"
    )
    before = await cur.fetchone()
    path = write(tmp_path, "name\nA\n")
    with pytest.raises(InvalidInput) as caught:
        await import_csv(conn, path, "step_a,normalise_domain")
    message = str(caught.value)
    assert message.startswith("unknown step(s): normalise_domain; known steps: ")
    for step in ("clean_company_name", "normalize_domain", "step_a", "step_b"):
        assert step in message
    assert "did you mean 'normalize_domain'" in message
    assert await counts(conn) == (0, 0, 0)
    cur = await conn.execute(
        "select last_value from pg_sequences where sequencename = 'batch_items_seq_seq'"
    )
    assert await cur.fetchone() == before  # COPY never ran: no identity value was drawn


async def test_missing_file(conn: Conn, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="no such file"):
        await import_csv(conn, tmp_path / "nope.csv", "step_a")


async def test_values_are_cleaned(conn: Conn, tmp_path: Path) -> None:
    path = write(tmp_path, "name,notes\n\u00a0Acme\u00a0,a\\b\tc\x00d\n")
    report = await import_csv(conn, path, "step_a", delimiter=",")
    assert await items(conn, report.batch_id) == [{"name": "Acme", "notes": "a\\b\tcd"}]


async def test_import_from_a_dsn_with_client_and_progress(dsn: str, tmp_path: Path) -> None:
    path = write(tmp_path, "name\n" + "".join(f"C{i}\n" for i in range(25)))
    seen: list[ImportProgress] = []
    client = UUID("11111111-2222-3333-4444-555555555555")
    report = await import_csv(
        dsn, path, "step_a", client_id=client, progress=seen.append, progress_every=10
    )
    assert [p.rows_read for p in seen] == [10, 20, 25]
    assert seen[-1].bytes_read == seen[-1].total_bytes == path.stat().st_size
    async with await psycopg.AsyncConnection.connect(dsn) as aconn:
        cur = await aconn.execute(
            "select client_id, item_count from batches where id = %s", (report.batch_id,)
        )
        assert await cur.fetchone() == (client, 25)


async def test_examples_companies_csv_imports_cleanly(conn: Conn) -> None:
    path = Path(__file__).resolve().parent.parent / "examples" / "companies.csv"
    report = await import_csv(conn, path, "normalize_domain,clean_company_name")
    assert report.rows_imported >= 250
    assert report.rows_skipped == 0
    assert report.headers.unmapped == {}
    assert {"name", "website", "email", "linkedin_url"} <= set(report.headers.keys)
