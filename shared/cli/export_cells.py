"""Cell values of ``enrich export``: readable text for people, neutralised for spreadsheets.

Spreadsheet exports (CSV and Excel) hold no JSON: a list is its items joined with ``"; "``, an
object its ``key: value`` pairs joined the same way, true and false are ``true`` and ``false``.
JSON lines keep the JSON values (``shared.cli.export_writers``).

CSV cells are neutralised for spreadsheets by default (OWASP, "CSV Injection":
https://owasp.org/www-community/attacks/CSV_Injection): a text cell or header starting with
``= + - @``, tab, CR or LF, which Excel, LibreOffice or Google Sheets would run as a formula, gets a
single quote in front (``'=HYPERLINK(...)`` shows as text). Numbers stay as they are: a JSON number
is written as a numeric literal, and a text cell that is a plain decimal number (``-5``,
``-1.5e3``) is read by a spreadsheet as that number, never a formula, so prefixing it would only
turn the operator's figures into text. A row holding ``;`` or a tab inside a cell is written
with every cell quoted, since a spreadsheet splitting on ``;`` (the list separator of many
locales) would otherwise start a new, unneutralised cell there (so is a row with a CR in a cell,
which Python's csv writer would leave bare and break the row). ``--raw-cells`` writes the text
unchanged, for programs rather than spreadsheets. An .xlsx needs none of this: its text cells are
written as text (``write_string``), which Excel never evaluates.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

# Between the items of a list, and the pairs of an object, in a spreadsheet cell.
JOIN = "; "
# First characters that make a spreadsheet read a cell as a formula (OWASP's list).
FORMULA_TRIGGERS = frozenset("=+-@\t\r\n")
# Text a spreadsheet reads as a plain number, hence never as a formula: left as it is.
_plain_number = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?").fullmatch


def csv_cell(value: Any) -> str:
    """Strings as they are, nothing as an empty cell, anything else as its readable text."""
    kind = type(value)
    if kind is str:
        return value  # type: ignore[no-any-return]
    if value is None:
        return ""
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return repr(value)  # as JSON writes it (jsonb holds no NaN or infinity)
    return readable(value)


def readable(value: Any) -> str:
    """A JSON value as text a person reads: lists and objects joined with ``"; "``."""
    if isinstance(value, list):
        return JOIN.join(csv_cell(item) for item in value if item is not None)
    if isinstance(value, dict):
        return JOIN.join(f"{key}: {csv_cell(item)}" for key, item in value.items())
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str | bool | int | float) or value is None:
        return csv_cell(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def neutralise(text: str) -> str:
    """``text`` with a single quote in front when a spreadsheet would run it as a formula."""
    if text and text[0] in FORMULA_TRIGGERS and _plain_number(text) is None:
        return "'" + text
    return text


def spreadsheet_cell(value: Any) -> str:
    """``csv_cell(value)``, neutralised. Only text can start a formula: a number's text is a
    numeric literal, and a list or object's text starts with its first item, so it is checked
    like any text."""
    kind = type(value)
    if kind is str:  # the common case first: most cells are text
        return neutralise(value)
    if kind in (int, float, bool) or value is None:
        return csv_cell(value)
    return neutralise(csv_cell(value))


def needs_quoting(cells: Sequence[str]) -> bool:
    """Whether the row must be written fully quoted, which the csv module's minimal quoting does
    not do for: ``;`` or a tab in a cell (a spreadsheet splitting there would start a cell the
    neutralisation never saw) and a CR (Python 3.11's writer leaves it bare with a ``\n`` line
    terminator, and a reader then ends the row there)."""
    joined = "".join(cells)
    return ";" in joined or "\t" in joined or "\r" in joined


__all__ = [
    "FORMULA_TRIGGERS",
    "JOIN",
    "csv_cell",
    "needs_quoting",
    "neutralise",
    "readable",
    "spreadsheet_cell",
]
