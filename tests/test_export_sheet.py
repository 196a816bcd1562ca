"""``enrich export`` for the people who open it in a spreadsheet (issue 10, item 4).

The CSV keeps the file's own headers, adds ``item_id``, then per step its status, error and
declared outputs under readable names, no JSON in a cell; the columns are fixed by the blueprint,
not by how far the batch got. ``--excel`` (or ``-o X.xlsx``) writes a real workbook whose text
stays text. A name and a format that disagree are refused; a symbolic link is never replaced.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any
from uuid import UUID

import openpyxl
import pytest

from shared.cli import export_command, export_writers
from shared.cli.export_cells import csv_cell
from shared.pg_state import PgStateAPI
from shared.state_api import StepResult, TaskRef
from shared.step_outputs import CLAY_FIELDS, OUTPUTS
from tests.test_cli_batch import enrich
from tests.test_e2e_local import EXAMPLE_CSV, enrich_run
from tests.test_e2e_local import HEADER as EXAMPLE_HEADER
from tests.test_export_cells import read_csv

TWO_STEPS = ["normalize_domain", "clean_company_name"]
TWO_STEP_COLUMNS = [
    "item_id",
    "normalize_domain: status",
    "normalize_domain: error",
    "normalize_domain: domain",
    "clean_company_name: status",
    "clean_company_name: error",
    "clean_company_name: name",
    "clean_company_name: removed",
]


def create_from_csv(tmp_path: Path, text: str, steps: str) -> str:
    source = tmp_path / "in.csv"
    source.write_text(text, encoding="utf-8")
    created = enrich("batch", "create", str(source), "--steps", steps)
    assert created.exit_code == 0, created.stderr
    source.unlink()
    return created.stdout.strip().splitlines()[-1]


def complete_all(dsn: str, batch_id: str, result: dict[str, Any]) -> list[TaskRef]:
    """Complete every item's first step with ``result``, as a worker would."""

    async def go() -> list[TaskRef]:
        api = await PgStateAPI.open(dsn, min_size=1, max_size=1)
        async with api:
            claimed = [c.task for c in await api.claim(100, batch_ids=[UUID(batch_id)])]
            assert all(s.ok for s in await api.start(claimed))
            assert all(d.ok for d in await api.complete([StepResult(t, result) for t in claimed]))
            return claimed

    return asyncio.run(go())


# The example, end to end --------------------------------------------------------------------------


def test_the_example_exports_with_its_own_headers_and_readable_cells(
    db: str, tmp_path: Path
) -> None:
    run = enrich_run(db, str(EXAMPLE_CSV), "--steps", ",".join(TWO_STEPS))
    assert run.returncode == 0, run.stderr
    batch_id = run.stdout.strip()
    out = tmp_path / "companies-enriched.csv"

    exported = enrich("export", batch_id, "-o", str(out))

    assert exported.exit_code == 0, exported.stderr
    rows = read_csv(out.read_text(encoding="utf-8"))
    assert rows[0] == EXAMPLE_HEADER + TWO_STEP_COLUMNS
    assert len(rows) == 301
    first = dict(zip(rows[0], rows[1], strict=True))
    UUID(first.pop("item_id"))
    assert first == {
        "Company Name": "Beacon Foods, Ltda.",
        "Website": "beaconfoods.com.br",
        "LinkedIn URL": "https://www.linkedin.com/company/beaconfoods",
        "Country": "Brazil",
        "City": "São Paulo",
        "Employees": "146",
        "Industry": "Food & Beverage",
        "Contact Email": "",
        "normalize_domain: status": "completed",
        "normalize_domain: error": "",
        "normalize_domain: domain": "beaconfoods.com.br",
        "clean_company_name: status": "completed",
        "clean_company_name: error": "",
        "clean_company_name: name": "Beacon Foods",
        "clean_company_name: removed": "Ltda.",
    }
    assert not any(cell.startswith(("[", "{")) for row in rows for cell in row)


# Columns ------------------------------------------------------------------------------------------


def test_the_columns_follow_the_blueprint_not_the_progress(db: str, tmp_path: Path) -> None:
    # A column empty in every row is in no item's raw_data, but it was in the file.
    batch_id = create_from_csv(
        tmp_path, "Company Name,Notes,Web Site\nAcme Inc,,acme.com\n", ",".join(TWO_STEPS)
    )

    rows = read_csv(enrich("export", batch_id, "-o", "-").stdout)

    assert rows[0] == ["Company Name", "Notes", "Web Site", *TWO_STEP_COLUMNS]
    assert rows[1][:3] + rows[1][4:] == [
        "Acme Inc",
        "",
        "acme.com",
        "pending",
        "",
        "",
        "not reached",
        "",
        "",
        "",
    ]


def test_all_columns_adds_the_technical_ones(db: str, tmp_path: Path) -> None:
    batch_id = create_from_csv(tmp_path, "name\nAcme\n", "step_a")
    complete_all(db, batch_id, {"n": 1, "detail": {"a": 1}, "cached_from": {"batch_id": "x"}})

    default = read_csv(enrich("export", batch_id, "-o", "-").stdout)
    every = read_csv(enrich("export", batch_id, "-o", "-", "--all-columns").stdout)

    # A step declaring no outputs shows its result keys, but what the status already tells.
    assert default[0] == [
        "name",
        "item_id",
        "step_a: status",
        "step_a: error",
        "step_a: detail",
        "step_a: n",
    ]
    assert default[1][2:] == ["completed", "", "a: 1", "1"]
    assert every[0] == default[0] + [
        "step_a: attempts",
        "step_a: call id",
        "step_a: started at",
        "step_a: finished at",
        "step_a: result (JSON)",
    ]
    technical = dict(zip(every[0][6:], every[1][6:], strict=True))
    assert technical["step_a: attempts"] == "1"
    assert technical["step_a: started at"] < technical["step_a: finished at"]
    assert json.loads(technical["step_a: result (JSON)"])["cached_from"] == {"batch_id": "x"}


def test_declared_outputs_are_keys_the_steps_return() -> None:
    """A renamed result key fails here rather than leaving an empty column."""
    from shared.steps.clay_enrich import COMMON_FIELDS, parse_clay_callback
    from shared.steps.domains import find_domain
    from shared.steps.exa_verify import verdict
    from shared.steps.names import find_name

    task = TaskRef(UUID(int=1), UUID(int=2), "clay_enrich", 1)
    clay = parse_clay_callback(task, {"company_name": "Acme"})
    assert isinstance(clay, StepResult)
    results = {
        "normalize_domain": find_domain({"website": "acme.com"}, {}),
        "clean_company_name": find_name({"name": "Acme Inc"}, {}),
        "exa_verify": verdict("acme.com", (), by_name=True),
        "clay_enrich": clay.result,
    }
    for function, outputs_of in OUTPUTS.items():
        declared = {output.key for output in outputs_of({})}
        assert declared <= set(results[function]), function
    assert [output.key for output in CLAY_FIELDS] == list(COMMON_FIELDS)
    missing = {o.key for o in OUTPUTS["normalize_domain"]({"allow_missing": True})}
    assert missing == {"domain", "missing"}


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (["x", "y"], "x; y"),
        ({"k": "v", "n": 1}, "k: v; n: 1"),
        ([{"url": "a"}, None, 2], "url: a; 2"),
    ],
)
def test_a_cell_holds_no_json(value: Any, shown: str) -> None:
    assert csv_cell(value) == shown


# Excel --------------------------------------------------------------------------------------------


def test_excel_keeps_text_as_text_and_numbers_as_numbers(db: str, tmp_path: Path) -> None:
    batch_id = create_from_csv(
        tmp_path,
        "Company Name,Employees,Zip,Note\nAcme,1-10,00123,=1+1\n",
        "step_a",
    )
    complete_all(db, batch_id, {"count": 7, "ok": True, "tags": ["a", "b"]})
    out = tmp_path / "out.xlsx"

    result = enrich("export", batch_id, "-o", str(out))

    assert result.exit_code == 0, result.stderr
    assert "(xlsx)" in result.stderr
    sheet = openpyxl.load_workbook(out, read_only=True).active
    assert sheet is not None
    header, row = [list(r) for r in sheet.iter_rows()]
    assert [c.value for c in header] == [
        "Company Name",
        "Employees",
        "Zip",
        "Note",
        "item_id",
        "step_a: status",
        "step_a: error",
        "step_a: count",
        "step_a: ok",
        "step_a: tags",
    ]
    cells = {h.value: c for h, c in zip(header, row, strict=False)}
    for name, text in (("Employees", "1-10"), ("Zip", "00123"), ("Note", "=1+1")):
        assert (cells[name].value, cells[name].data_type) == (text, "s"), name
    assert (cells["step_a: count"].value, cells["step_a: count"].data_type) == (7, "n")
    assert cells["step_a: ok"].value is True
    assert cells["step_a: tags"].value == "a; b"
    assert cells["step_a: status"].value == "completed"
    assert [p.name for p in tmp_path.iterdir()] == ["out.xlsx"]  # no temporary file left

    again = tmp_path / "report.xlsx"
    flagged = enrich("export", batch_id, "-o", str(again), "--excel", "--status", "completed")
    assert flagged.exit_code == 0, flagged.stderr
    assert again.read_bytes()[:2] == b"PK"  # a zip: a real workbook


def test_excel_says_when_a_cell_was_cut_at_its_limit(db: str, tmp_path: Path) -> None:
    batch_id = create_from_csv(tmp_path, "name\nAcme\n", "step_a")
    complete_all(db, batch_id, {"essay": "x" * 40_000})
    out = tmp_path / "out.xlsx"

    result = enrich("export", batch_id, "-o", str(out))

    assert result.exit_code == 0, result.stderr
    assert "1 cell(s) longer than Excel's 32,767 characters were cut" in result.stderr
    sheet = openpyxl.load_workbook(out, read_only=True).active
    assert sheet is not None
    assert [len(str(v)) for v in next(sheet.iter_rows(min_row=2, values_only=True))][-1] == 32_767


@pytest.mark.parametrize(
    ("name", "flags", "message"),
    [
        ("out.xlsx", ("--format", "csv"), "out.xlsx is a spreadsheet's name but --format csv"),
        ("out.xlsx", ("--format", "jsonl"), "--format jsonl writes JSONL text"),
        ("out.xls", (), "out.xls is a spreadsheet's name"),
        ("out.csv", ("--excel",), "an Excel workbook is written to a file named .xlsx, not"),
        ("-", ("--excel",), "not stdout: give -o NAME.xlsx"),
        ("out.xlsx", ("--excel", "--format", "csv"), "--excel writes an Excel workbook, not csv"),
        ("out.jsonl", ("--all-columns",), "--all-columns is for CSV and Excel"),
    ],
)
def test_a_name_and_a_format_that_disagree_are_refused(
    db: str, tmp_path: Path, name: str, flags: tuple[str, ...], message: str
) -> None:
    batch_id = create_from_csv(tmp_path, "name\nAcme\n", "step_a")
    target = name if name == "-" else str(tmp_path / name)

    result = enrich("export", batch_id, "-o", target, *flags)

    assert result.exit_code == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_excel_refuses_more_rows_than_a_sheet_holds(
    db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id = create_from_csv(tmp_path, "name\nA\nB\nC\n", "step_a")
    monkeypatch.setattr(export_command, "XLSX_MAX_ROWS", 2)
    monkeypatch.setattr(export_writers, "XLSX_MAX_ROWS", 2)

    every = enrich("export", batch_id, "-o", str(tmp_path / "all.xlsx"))
    filtered = enrich("export", batch_id, "-o", str(tmp_path / "some.xlsx"), "--status", "failed")
    assert filtered.exit_code == 0, filtered.stderr  # no failed item: fits
    complete_all(db, batch_id, {})
    completed = enrich(
        "export", batch_id, "-o", str(tmp_path / "done.xlsx"), "--status", "completed"
    )

    assert every.exit_code == 2
    assert "has 3 items: an Excel sheet holds 2; export CSV instead" in every.stderr
    assert completed.exit_code == 2
    assert "more than 2 rows: an Excel sheet holds no more" in completed.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["some.xlsx"]


# Symbolic links -----------------------------------------------------------------------------------


def test_a_symbolic_link_keeps_its_link_and_a_loop_is_refused(db: str, tmp_path: Path) -> None:
    batch_id = create_from_csv(tmp_path, "name\nAcme\n", "step_a")
    target = tmp_path / "exports" / "latest-real.csv"
    target.parent.mkdir()
    target.write_text("old\n", encoding="utf-8")
    link = tmp_path / "latest.csv"
    link.symlink_to(target)
    loop_a, loop_b = tmp_path / "a.csv", tmp_path / "b.csv"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)

    followed = enrich("export", batch_id, "-o", str(link))
    looped = enrich("export", batch_id, "-o", str(loop_a))

    assert followed.exit_code == 0, followed.stderr
    assert link.is_symlink() and link.resolve() == target
    assert read_csv(target.read_text(encoding="utf-8"))[1][0] == "Acme"
    assert looped.exit_code == 2
    assert f"cannot write {loop_a}: a symbolic link that leads round in a loop" in looped.stderr
    assert loop_a.is_symlink() and loop_b.is_symlink()
