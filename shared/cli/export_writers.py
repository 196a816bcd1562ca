"""The three formats of ``enrich export``, each streaming rows from a server-side cursor.

- CSV: a spreadsheet's layout (``export_sheet``), cells neutralised (``export_cells``).
- Excel (.xlsx) through XlsxWriter in ``constant_memory`` mode, which writes each row to a
  temporary file once the next begins, so a million rows take no more memory than one
  (https://xlsxwriter.readthedocs.io/working_with_memory.html). Text is written with
  ``write_string``, never ``write``: ``1-10`` stays the text it was rather than a date, ``00123``
  keeps its zeros, and ``=...`` is never a formula. JSON numbers are numbers, true and false are
  booleans; an integer of 16 digits or more is text, since Excel keeps only 15 significant digits.
- JSON lines, the machine format: every input and result key with its JSON type.
"""

from __future__ import annotations

import csv
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import xlsxwriter  # type: ignore[import-untyped]
from xlsxwriter.exceptions import FileCreateError  # type: ignore[import-untyped]
from xlsxwriter.worksheet import Worksheet  # type: ignore[import-untyped]

from shared.cli.export_cells import csv_cell, needs_quoting, neutralise, readable, spreadsheet_cell
from shared.cli.export_output import TextSink
from shared.errors import InvalidInput

# Exports show progress every this many rows.
PROGRESS_EVERY = 5_000
# An Excel sheet has 1,048,576 rows; one holds the header.
XLSX_MAX_ROWS = 1_048_575
# Excel keeps 15 significant digits: a larger integer is written as text to stay exact.
XLSX_MAX_EXACT = 10**15
SHEET_NAME = "export"

Values = Callable[[Sequence[Any]], list[Any]]
Tick = Callable[[int], None]
Cursor = psycopg.AsyncServerCursor[Any]


async def write_csv(
    cur: Cursor, headers: list[str], values: Values, out: TextSink, tick: Tick, *, raw: bool
) -> int:
    """Write the header and each row; ``raw`` leaves formula-like text as it is."""
    rows = 0
    writer = csv.writer(out, lineterminator="\n")
    quoted = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
    cell = csv_cell if raw else spreadsheet_cell
    header = headers if raw else [neutralise(h) for h in headers]
    (quoted if needs_quoting(header) else writer).writerow(header)
    async for row in cur:
        cells = [cell(v) for v in values(row)]
        (quoted if needs_quoting(cells) else writer).writerow(cells)
        rows += 1
        if rows % PROGRESS_EVERY == 0:
            tick(rows)
    return rows


async def write_jsonl(
    cur: Cursor, columns: list[str], values: Values, out: TextSink, tick: Tick
) -> int:
    rows = 0
    async for row in cur:
        line = dict(zip(columns, values(row), strict=True))
        out.write(json.dumps(line, ensure_ascii=False))
        out.write("\n")
        rows += 1
        if rows % PROGRESS_EVERY == 0:
            tick(rows)
    return rows


async def write_xlsx(
    cur: Cursor, headers: list[str], values: Values, path: Path, tick: Tick
) -> tuple[int, int]:
    """Write a workbook of one sheet to ``path``: (rows, cells cut at Excel's 32,767 characters).

    Raises ``OSError`` when the file cannot be written, ``InvalidInput`` past Excel's row limit.
    XlsxWriter keeps its row data in named temporary files until ``close``: they go in a hidden
    directory beside the export, on the disk that must hold it anyway (``/tmp`` may be memory),
    removed whatever happens.
    """
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".enrich-xlsx-") as work:
        workbook = xlsxwriter.Workbook(
            str(path),
            {
                "constant_memory": True,
                "tmpdir": work,
                "strings_to_formulas": False,
                "strings_to_urls": False,
                "strings_to_numbers": False,
            },
        )
        sheet = workbook.add_worksheet(SHEET_NAME)
        _write_header(workbook, sheet, headers)
        rows = cut = 0
        async for row in cur:
            rows += 1
            if rows > XLSX_MAX_ROWS:
                raise InvalidInput(
                    f"more than {XLSX_MAX_ROWS:,} rows: an Excel sheet holds no more; "
                    "export CSV instead (-o NAME.csv)"
                )
            for col, value in enumerate(values(row)):
                cut += _write_cell(sheet, rows, col, value)
            if rows % PROGRESS_EVERY == 0:
                tick(rows)
        try:
            workbook.close()
        except FileCreateError as exc:  # it wraps the OSError of writing the file
            cause = exc.args[0] if exc.args else None
            raise cause if isinstance(cause, OSError) else OSError(str(exc)) from exc
    return rows, cut


def _write_header(workbook: Any, sheet: Worksheet, headers: list[str]) -> None:
    """Bold names, frozen above the rows, columns wide enough to read them."""
    bold = workbook.add_format({"bold": True})
    for col, name in enumerate(headers):
        sheet.set_column(col, col, min(max(len(name) + 2, 10), 50))
        sheet.write_string(0, col, name, bold)
    sheet.freeze_panes(1, 0)


def _write_cell(sheet: Worksheet, row: int, col: int, value: Any) -> int:
    """Write one value as its type; 1 when Excel's length limit cut it, else 0."""
    kind = type(value)
    if value is None:
        return 0
    if kind is bool:
        sheet.write_boolean(row, col, value)
    elif (kind is int or kind is float) and abs(value) < XLSX_MAX_EXACT:
        sheet.write_number(row, col, value)
    else:
        text = value if kind is str else readable(value)
        # write_string returns -2 when it cut the text to Excel's 32,767 characters.
        return 1 if sheet.write_string(row, col, text) == -2 else 0
    return 0


__all__ = ["PROGRESS_EVERY", "XLSX_MAX_ROWS", "write_csv", "write_jsonl", "write_xlsx"]
