"""``enrich export``: a batch's items with each step's status, error and results, in input order.

Three formats (``export_writers``): CSV, laid out for a spreadsheet (``export_sheet``: the file's
own headers, ``item_id``, per step its status, error and declared outputs; ``--all-columns``
adds the technical ones), a real Excel workbook (``--excel``, or an output named ``.xlsx``) with
the same columns, and JSON lines (an output named ``.jsonl``/``.ndjson``), the machine format with
every key and JSON types. A name and a format that disagree are refused (``-o out.xlsx
--format csv``, ``--excel -o out.csv``): a spreadsheet opening CSV text under an .xlsx name
reports a broken file.

It streams a million-row batch in bounded memory: the columns are aggregates computed in the
database, and the rows come through a server-side (named) cursor, all in one read-only REPEATABLE
READ transaction, so the columns match the rows even while workers run. A file is written to a
temporary name beside it and renamed at the end (``export_output``).

Output conventions as ``batch_commands``: data on stdout, messages on stderr; exit 0 success, 1 an
unknown batch or a database problem, 2 bad input, 130 interrupted. For ``export`` bad input
includes an output that cannot be created (no such directory, permission denied, a name too
long, a read-only file system, a symbolic link in a loop): that is tried before the database is
asked, so it is refused with nothing done. A failure once the export runs (a full disk, an I/O
error, a closed pipe) exits 1, the previous file untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID, uuid4

import click
import psycopg
from psycopg.types.json import set_json_loads
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from shared.cli.batch_commands import EXIT_BAD_INPUT, _fail, _run, _stderr
from shared.cli.export_output import check_output, open_binary_output, open_output
from shared.cli.export_plan import ExportPlan, StatusFilter, build_plan, row_values, rows_query
from shared.cli.export_sheet import sheet_layout
from shared.cli.export_writers import XLSX_MAX_ROWS, write_csv, write_jsonl, write_xlsx
from shared.cli.text import visible
from shared.db.connect import resolve_dsn
from shared.errors import EnrichError, InvalidInput

Format = Literal["csv", "jsonl", "xlsx"]

# Rows fetched per round trip of the server-side cursor: the memory bound of an export.
FETCH_ROWS = 2_000
# Exports of at least this many items show a progress bar (when stderr is a terminal).
PROGRESS_BAR_ROWS = 100_000
JSONL_SUFFIXES = (".jsonl", ".ndjson")


def choose_format(output: str, fmt: Format | None, *, excel: bool, all_columns: bool) -> Format:
    """The format to write, or ``InvalidInput`` when the options and the name disagree."""
    name = output.lower()
    if excel:
        if fmt not in (None, "xlsx"):
            raise InvalidInput(f"--excel writes an Excel workbook, not {fmt}: drop one of them")
        fmt = "xlsx"
    chosen: Format = fmt or (
        "xlsx" if name.endswith(".xlsx") else "jsonl" if name.endswith(JSONL_SUFFIXES) else "csv"
    )
    if chosen == "xlsx" and not name.endswith(".xlsx"):
        shown = "stdout" if output == "-" else output
        raise InvalidInput(
            f"an Excel workbook is written to a file named .xlsx, not {shown}: "
            "give -o NAME.xlsx (or leave out --excel / --format xlsx for CSV)"
        )
    if name.endswith(".xls"):
        raise InvalidInput(
            f"{output} is a spreadsheet's name of the old .xls kind, which enrich does not "
            "write: name it .xlsx for an Excel workbook (or .csv for CSV text)"
        )
    if chosen != "xlsx" and name.endswith(".xlsx"):
        raise InvalidInput(
            f"{output} is a spreadsheet's name but --format {chosen} writes {chosen.upper()} "
            "text: leave out --format to write an .xlsx workbook, or name the file ."
            f"{chosen}"
        )
    if all_columns and chosen == "jsonl":
        raise InvalidInput("--all-columns is for CSV and Excel: JSON lines hold every column")
    return chosen


@dataclass(frozen=True, slots=True)
class ExportReport:
    rows: int
    columns: int
    target: str
    fmt: Format
    cut: int = 0  # xlsx cells cut at Excel's 32,767 characters


async def export_batch(
    dsn: str,
    batch_id: UUID,
    target: str,
    *,
    fmt: Format = "csv",
    status: StatusFilter = "all",
    console: Console | None = None,
    raw_cells: bool = False,
    all_columns: bool = False,
) -> ExportReport:
    """Stream the batch to ``target`` (a path, or ``-`` for stdout). See the module docstring;
    ``raw_cells`` turns off the spreadsheet neutralisation of CSV cells."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
        await conn.set_read_only(True)
        set_json_loads(_json_loads, conn)
        async with conn.transaction():
            # The whole result is read: plan for all of it (hash joins, one sort) rather than for
            # the first rows (an index lookup per item and step), and skip JIT compilation.
            await conn.execute("set local cursor_tuple_fraction = 1")
            await conn.execute("set local jit = off")
            plan = await build_plan(conn, batch_id, sheet=fmt != "jsonl")
            if fmt == "xlsx" and status == "all" and plan.item_count > XLSX_MAX_ROWS:
                raise InvalidInput(
                    f"batch {batch_id} has {plan.item_count:,} items: an Excel sheet holds "
                    f"{XLSX_MAX_ROWS:,}; export CSV instead (-o NAME.csv)"
                )
            try:
                return await _stream(
                    conn, plan, target, fmt, status, console, raw_cells, all_columns
                )
            except OSError as exc:
                if isinstance(exc, BrokenPipeError) and target == "-":
                    raise  # the reader went away (`| head`): the command exits quietly
                shown = "stdout" if target == "-" else target
                raise EnrichError(f"cannot write {shown}: {exc.strerror or exc}") from exc


async def _stream(
    conn: psycopg.AsyncConnection[Any],
    plan: ExportPlan,
    target: str,
    fmt: Format,
    status: StatusFilter,
    console: Console | None,
    raw_cells: bool,
    all_columns: bool,
) -> ExportReport:
    """Run the rows query through a server-side cursor into the chosen writer."""
    statement, params = rows_query(plan, status, technical=all_columns)
    big = plan.item_count >= PROGRESS_BAR_ROWS
    bar = console if console is not None and console.is_terminal and big else None
    total = plan.item_count if status == "all" else None
    cur = conn.cursor(name=f"enrich_export_{uuid4().hex[:8]}")
    cur.itersize = FETCH_ROWS
    cut = 0
    with _progress_bar(bar, total) as tick:
        if fmt == "jsonl":
            columns = plan.columns
            with open_output(target) as out:
                await cur.execute(statement, params)
                rows = await write_jsonl(cur, columns, lambda r: row_values(plan, r), out, tick)
        else:
            sheet = sheet_layout(plan, all_columns=all_columns)
            columns = sheet.headers
            if fmt == "xlsx":
                with open_binary_output(target) as path:
                    await cur.execute(statement, params)
                    rows, cut = await write_xlsx(cur, columns, sheet.values, path, tick)
            else:
                with open_output(target) as out:
                    await cur.execute(statement, params)
                    rows = await write_csv(cur, columns, sheet.values, out, tick, raw=raw_cells)
    await cur.close()
    return ExportReport(rows, len(columns), target, fmt, cut)


_decode_json = json.JSONDecoder().decode


def _json_loads(data: str | bytes) -> Any:
    """``json.loads`` without its encoding detection: PostgreSQL sends UTF-8."""
    return _decode_json(data if isinstance(data, str) else data.decode("utf-8"))


@contextlib.contextmanager
def _progress_bar(console: Console | None, total: int | None) -> Iterator[Callable[[int], None]]:
    """A ``tick(rows)`` callable: a live bar on a terminal, else a no-op."""
    if console is None:
        yield lambda rows: None
        return
    with Progress(
        TextColumn("exporting"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("export", total=total)
        yield lambda rows: bar.update(task, completed=rows)


# The command ------------------------------------------------------------------------------------


@click.command("export")
@click.argument("batch_id", metavar="BATCH", type=click.UUID)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="The file to write (replaced atomically; a symbolic link's target is), or - for stdout.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "xlsx", "jsonl"]),
    help="Output format (default: xlsx for a .xlsx file, jsonl for .jsonl/.ndjson, else csv).",
)
@click.option("--excel", is_flag=True, help="Write an Excel workbook (-o must end in .xlsx).")
@click.option(
    "--status",
    type=click.Choice(["all", "completed", "failed"]),
    default="all",
    show_default=True,
    help="Which items: all, those that completed every step, or those stopped by a failed step.",
)
@click.option(
    "--all-columns",
    is_flag=True,
    help="CSV and Excel: add each step's attempts, call id, start and finish times and whole "
    "result (JSON).",
)
@click.option(
    "--raw-cells",
    is_flag=True,
    help="CSV: write text exactly as stored, without the quote put before cells a spreadsheet "
    "would run as formulas (= + - @, tab, CR, LF). For programs, not spreadsheets.",
)
def export(
    batch_id: UUID,
    output: str,
    fmt: Format | None,
    excel: bool,
    status: StatusFilter,
    all_columns: bool,
    raw_cells: bool,
) -> None:
    """Write BATCH's items with every step's status, error and results, in input order.

    CSV and Excel: the input columns under the file's own headers, item_id, then per step
    "<step>: status", "<step>: error" and the step's useful outputs ("normalize_domain: domain");
    lists are joined with "; ", never JSON. JSON lines: every input and result key, JSON typed.

    CSV is safe to open in a spreadsheet: text starting with = + - @, tab, CR or LF gets a single
    quote in front so it shows as text instead of running as a formula (plain numbers such as -5
    are left alone), and a row with ; or a tab in a cell is fully quoted. --raw-cells turns this
    off. An .xlsx holds text as text: 1-10 stays 1-10, never a date or a formula.
    """
    err = _stderr()
    try:
        chosen = choose_format(output, fmt, excel=excel, all_columns=all_columns)
        check_output(output)
    except InvalidInput as exc:
        _fail(str(exc), EXIT_BAD_INPUT)

    async def go() -> ExportReport:
        return await export_batch(
            await resolve_dsn(),
            batch_id,
            output,
            fmt=chosen,
            status=status,
            console=err,
            raw_cells=raw_cells,
            all_columns=all_columns,
        )

    try:
        report = _run(go)
    except BrokenPipeError:
        # Python's advice: point stdout at /dev/null so the exit flush does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    _report(err, report, batch_id, status)


def _report(err: Console, report: ExportReport, batch_id: UUID, status: StatusFilter) -> None:
    shown = "stdout" if report.target == "-" else visible(report.target)
    which = "" if status == "all" else f" ({status} items)"
    err.print(
        Text.assemble(
            ("exported ", "green"),
            f"{report.rows:,} row(s){which} x {report.columns} column(s) of batch {batch_id} "
            f"to {shown} ({report.fmt})",
        )
    )
    if report.cut:
        err.print(
            Text(
                f"{report.cut:,} cell(s) longer than Excel's 32,767 characters were cut; "
                "a CSV or JSON lines export keeps them whole",
                style="yellow",
            )
        )


__all__ = ["ExportReport", "choose_format", "export", "export_batch"]
