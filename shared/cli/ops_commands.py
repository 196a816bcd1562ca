"""``enrich export``, ``enrich retry``, ``enrich cancel``: results out of a batch, and operating it.

``export`` writes one row per item, in input order (``batch_items.seq``): the item's input columns
(the union of the ``raw_data`` keys, in first-seen order), then for each blueprint step
``<step>.status`` (AWAITING_CALLBACK for an ASYNC row waiting for its provider, SKIPPED for a
COMPLETED row a condition skipped: its result's ``skipped`` says why), ``<step>.error``
(the error of a FAILED row) and one ``<step>.<key>`` column per
top-level key of the step's ``result`` (the union over the batch, in first-seen order). A result
key ``status`` or ``error`` becomes ``<step>.result.<key>``, so it never hides the state columns.

CSV cells are neutralised for spreadsheets by default (OWASP, "CSV Injection":
https://owasp.org/www-community/attacks/CSV_Injection): a text cell or header starting with
``= + - @``, tab, CR or LF, which Excel, LibreOffice or Google Sheets would run as a formula, gets a
single quote in front (``'=HYPERLINK(...)`` shows as text). Numbers stay as they are: a JSON number
is written as a numeric literal, and a text cell that is a plain decimal number (``-5``,
``-1.5e3``) is read by a spreadsheet as that number, never a formula, so prefixing it would only
turn the operator's figures into text. A row holding ``;`` or a tab inside a cell is written
with every cell quoted, since a spreadsheet splitting on ``;`` (the list separator of many
locales) would otherwise start a new, unneutralised cell there (so is a row with a CR in a cell,
which Python's csv writer would leave bare and break the row). ``--raw-cells`` writes the stored
text unchanged, for programs rather than spreadsheets; JSON lines are never changed.

It is built to stream a million-row batch in bounded memory: the column unions are aggregates
computed in the database, and the rows come through a server-side (named) cursor, all in one
read-only REPEATABLE READ transaction, so the columns match the rows even while workers run. A
file is written to a temporary name beside it and renamed at the end: a failed export leaves any
previous file untouched and no partial one.

Output conventions as ``batch_commands``: data on stdout, messages on stderr; exit 0 success, 1 an
unknown batch or a database problem, 2 bad input, 130 interrupted. For ``export`` bad input
includes an output that cannot be created (no such directory, permission denied, a name too
long, a read-only file system): that is tried before the database is asked, so it is refused
with nothing done. A failure once the export runs (a full disk, an I/O error, a closed pipe)
exits 1, the previous file untouched.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import io
import json
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from uuid import UUID, uuid4

import click
import psycopg
from psycopg import sql
from psycopg.types.json import set_json_loads
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text

from shared.cli.batch_commands import EXIT_BAD_INPUT, _fail, _run, _stderr
from shared.cli.text import visible
from shared.db.connect import resolve_dsn
from shared.errors import EnrichError, InvalidInput
from shared.pg_state import PgStateAPI
from shared.queries import query

Format = Literal["csv", "jsonl"]
StatusFilter = Literal["all", "completed", "failed"]

# Rows fetched per round trip of the server-side cursor: the memory bound of an export.
FETCH_ROWS = 2_000
# Exports of at least this many items show a progress bar (when stderr is a terminal).
PROGRESS_BAR_ROWS = 100_000
PROGRESS_EVERY = 5_000
# Result keys that would collide with a step's own state columns.
STATE_COLUMNS = ("status", "error")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


class TextSink(Protocol):
    def write(self, text: str, /) -> object: ...


# The export plan: which columns, from where -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepColumns:
    """One blueprint step's share of the export."""

    name: str
    results_table: str | None
    result_keys: tuple[str, ...]  # empty: no results table, or no result written yet


@dataclass(frozen=True, slots=True)
class ExportPlan:
    batch_id: UUID
    item_count: int
    input_keys: tuple[str, ...]
    steps: tuple[StepColumns, ...]

    @property
    def columns(self) -> list[str]:
        """The header: input keys, then per step status, error and result keys; all distinct."""
        names = list(self.input_keys)
        for step in self.steps:
            names += [f"{step.name}.status", f"{step.name}.error"]
            names += [
                f"{step.name}.result.{key}" if key in STATE_COLUMNS else f"{step.name}.{key}"
                for key in step.result_keys
            ]
        return _distinct(names)


def _distinct(names: Sequence[str]) -> list[str]:
    """Suffix ``#2``, ``#3``... to repeated names (say an input key ``step_a.status``)."""
    used: set[str] = set()
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in used:
            n += 1
            candidate = f"{name}#{n}"
        used.add(candidate)
        out.append(candidate)
    return out


def _result_keys_query(results_table: str) -> sql.Composed:
    """The union of the top-level keys of a results table's ``result``, first-seen order."""
    return sql.SQL(
        "select k.key from {table} r "
        "join public.batch_items bi on bi.batch_id = r.batch_id and bi.id = r.item_id "
        "cross join lateral jsonb_object_keys(case when jsonb_typeof(r.result) = 'object' "
        "then r.result else '{{}}'::jsonb end) as k(key) "
        "where r.batch_id = %(batch_id)s "
        'group by k.key order by min(bi.seq), k.key collate "C"'
    ).format(table=sql.Identifier("public", results_table))


async def build_plan(conn: psycopg.AsyncConnection[Any], batch_id: UUID) -> ExportPlan:
    """The columns of an export. Raises psycopg's ``NoDataFound`` (P0002) for an unknown batch."""
    params = {"batch_id": batch_id}
    cur = await conn.execute(query("export_steps"), params)
    step_rows = await cur.fetchall()
    item_count = int(step_rows[0][2]) if step_rows else 0
    cur = await conn.execute(query("export_input_keys"), params)
    input_keys = tuple(str(row[0]) for row in await cur.fetchall())
    steps: list[StepColumns] = []
    for step_name, results_table, _ in step_rows:
        keys: tuple[str, ...] = ()
        if results_table is not None:
            cur = await conn.execute(_result_keys_query(results_table), params)
            keys = tuple(str(row[0]) for row in await cur.fetchall())
        steps.append(StepColumns(str(step_name), results_table, keys))
    return ExportPlan(batch_id, item_count, input_keys, tuple(steps))


def rows_query(plan: ExportPlan, status: StatusFilter) -> tuple[sql.Composed, dict[str, Any]]:
    """One row per item in input order: raw_data, then per step status, error and result."""
    params: dict[str, Any] = {"batch_id": plan.batch_id}
    fields: list[sql.Composable] = [sql.SQL("bi.raw_data")]
    joins: list[sql.Composable] = []
    state_aliases: list[sql.Identifier] = []
    for i, step in enumerate(plan.steps):
        s = sql.Identifier(f"s{i}")
        state_aliases.append(s)
        params[f"step{i}"] = step.name
        # An ASYNC row waiting for its provider's callback is not "running", and a row a
        # condition skipped did not run: say so.
        fields.append(
            sql.SQL(
                "case when public.awaiting_callback({s}.status, {s}.attempt, {s}.meta)"
                " then 'AWAITING_CALLBACK'"
                " when {s}.status = 'COMPLETED' and {s}.meta ? 'skipped' then 'SKIPPED'"
                " else {s}.status::text end"
            ).format(s=s)
        )
        fields.append(
            sql.SQL("case when {s}.status = 'FAILED' then {s}.meta ->> 'error' end").format(s=s)
        )
        joins.append(
            sql.SQL(
                "left join public.workflow_states {s} on {s}.batch_id = bi.batch_id"
                " and {s}.item_id = bi.id and {s}.step_name = {step}"
            ).format(s=s, step=sql.Placeholder(f"step{i}"))
        )
        if step.results_table is not None and step.result_keys:
            r = sql.Identifier(f"r{i}")
            fields.append(sql.SQL("{r}.result").format(r=r))
            joins.append(
                sql.SQL(
                    "left join {table} {r} on {r}.batch_id = bi.batch_id and {r}.item_id = bi.id"
                ).format(table=sql.Identifier("public", step.results_table), r=r)
            )
    where: list[sql.Composable] = [sql.SQL("bi.batch_id = %(batch_id)s")]
    if status == "completed":  # finished the whole blueprint
        where.append(sql.SQL("{s}.status = 'COMPLETED'").format(s=state_aliases[-1]))
    elif status == "failed":  # stopped by a FAILED step
        where.append(
            sql.SQL("'FAILED' in ({})").format(
                sql.SQL(", ").join(sql.SQL("{}.status").format(s) for s in state_aliases)
            )
        )
    statement = sql.SQL("select {fields} from public.batch_items bi {joins} where {where}").format(
        fields=sql.SQL(", ").join(fields),
        joins=sql.SQL(" ").join(joins),
        where=sql.SQL(" and ").join(where),
    ) + sql.SQL(" order by bi.seq")
    return statement, params


def row_values(plan: ExportPlan, row: Sequence[Any]) -> list[Any]:
    """A fetched row as the export's values (JSON values; None where there is nothing)."""
    raw: dict[str, Any] = row[0]
    values: list[Any] = [raw.get(key) for key in plan.input_keys]
    i = 1
    for step in plan.steps:
        values.append(row[i])
        values.append(row[i + 1])
        i += 2
        if step.results_table is not None and step.result_keys:
            result = row[i]
            i += 1
            found: dict[str, Any] = result if isinstance(result, dict) else {}
            values.extend(found.get(key) for key in step.result_keys)
    return values


def csv_cell(value: Any) -> str:
    """Strings as they are, nothing as an empty cell, anything else as JSON text."""
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
    return json.dumps(value, ensure_ascii=False)


# Spreadsheet neutralisation of CSV cells (see the module docstring) --------------------------

# First characters that make a spreadsheet read a cell as a formula (OWASP's list).
FORMULA_TRIGGERS = frozenset("=+-@\t\r\n")
# Text a spreadsheet reads as a plain number, hence never as a formula: left as it is.
_plain_number = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?").fullmatch


def neutralise(text: str) -> str:
    """``text`` with a single quote in front when a spreadsheet would run it as a formula."""
    if text and text[0] in FORMULA_TRIGGERS and _plain_number(text) is None:
        return "'" + text
    return text


def spreadsheet_cell(value: Any) -> str:
    """``csv_cell(value)``, neutralised. Only text can start a formula: the JSON text of a number
    is a numeric literal, of a list, object or boolean starts with ``[``, ``{``, ``t`` or ``f``."""
    if type(value) is str:
        text: str = value
        if text and text[0] in FORMULA_TRIGGERS and _plain_number(text) is None:
            return "'" + text
        return text
    return csv_cell(value)


def _needs_quoting(cells: Sequence[str]) -> bool:
    """Whether the row must be written fully quoted, which the csv module's minimal quoting does
    not do for: ``;`` or a tab in a cell (a spreadsheet splitting there would start a cell the
    neutralisation never saw) and a CR (Python 3.11's writer leaves it bare with a ``\n`` line
    terminator, and a reader then ends the row there)."""
    joined = "".join(cells)
    return ";" in joined or "\t" in joined or "\r" in joined


_decode_json = json.JSONDecoder().decode


def _json_loads(data: str | bytes) -> Any:
    """``json.loads`` without its encoding detection: PostgreSQL sends UTF-8."""
    return _decode_json(data if isinstance(data, str) else data.decode("utf-8"))


# Writing --------------------------------------------------------------------------------------


def _destination(target: str) -> tuple[Path, bool]:
    """Where a file export really goes, and whether it is written in place.

    A symlink is followed (its target is replaced, the link kept, as ``>`` would). A device, a
    FIFO or a socket (``/dev/null``, ``/dev/stdout``, ``<(...)``) is written in place: renaming a
    file over it would replace ``/dev/null`` itself.
    """
    try:
        mode = os.stat(target).st_mode  # through links, /proc's magic ones (/dev/stdout) included
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        return Path(target), True
    return Path(os.path.realpath(target)), False


def _temporary(path: Path) -> Path:
    """The temporary file beside ``path``: hidden, unique, and never a name too long."""
    name = path.name if len(os.fsencode(path.name)) <= 200 else "export"
    return path.with_name(f".{name}.{uuid4().hex[:12]}.tmp")


def check_output(target: str) -> None:
    """Raise ``InvalidInput`` when an export could not write ``target``, with nothing left behind.

    It does what ``open_output`` will do (create the temporary file beside the target) and
    undoes it, rather than guess from permission bits: ``os.access`` says yes to root on a
    read-only or immutable directory, and knows nothing of names too long.
    """
    if target == "-":
        return
    parent = Path(target).parent
    if not parent.is_dir():
        raise InvalidInput(f"cannot write {target}: no such directory {str(parent)!r}")
    path, in_place = _destination(target)
    try:
        if in_place:
            if not os.access(path, os.W_OK):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES))
            return
        if len(os.fsencode(path.name)) > os.pathconf(path.parent, "PC_NAME_MAX"):
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        tmp = _temporary(path)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        tmp.unlink()
    except OSError as exc:
        raise InvalidInput(f"cannot write {target}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def open_output(target: str) -> Iterator[TextSink]:
    """A UTF-8 text sink to ``target`` (``-``: stdout), replacing the file atomically on success.

    The temporary file is created with mode 0666 minus the umask, like any new file, so the result
    gets the permissions ``>`` would give it. Stdout gets UTF-8 whatever the locale, with no
    newline translation; its bytes go straight to ``sys.stdout.buffer`` (no wrapper that could
    close it). A device or a FIFO is written in place (see ``_destination``).
    """
    if target == "-":
        sys.stdout.flush()
        binary: io.BufferedWriter | None = getattr(sys.stdout, "buffer", None)
        if binary is None:  # a replaced sys.stdout without bytes underneath
            yield sys.stdout
            sys.stdout.flush()
            return
        yield codecs.getwriter("utf-8")(binary)
        binary.flush()
        return
    path, in_place = _destination(target)
    if in_place:
        with path.open("w", encoding="utf-8", newline="") as out:
            yield out
        return
    tmp = _temporary(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "w", encoding="utf-8", newline="") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True, slots=True)
class ExportReport:
    rows: int
    columns: int
    target: str
    fmt: Format


async def export_batch(
    dsn: str,
    batch_id: UUID,
    target: str,
    *,
    fmt: Format = "csv",
    status: StatusFilter = "all",
    console: Console | None = None,
    raw_cells: bool = False,
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
            plan = await build_plan(conn, batch_id)
            statement, params = rows_query(plan, status)
            columns = plan.columns
            big = plan.item_count >= PROGRESS_BAR_ROWS
            bar = console if console is not None and console.is_terminal and big else None
            try:
                total = plan.item_count if status == "all" else None
                with open_output(target) as out, _progress_bar(bar, total) as tick:
                    cur = conn.cursor(name=f"enrich_export_{uuid4().hex[:8]}")
                    cur.itersize = FETCH_ROWS
                    await cur.execute(statement, params)
                    if fmt == "jsonl":
                        rows = await _write_jsonl(cur, plan, columns, out, tick)
                    else:
                        rows = await _write_csv(cur, plan, columns, out, tick, raw=raw_cells)
                    await cur.close()
            except OSError as exc:
                if isinstance(exc, BrokenPipeError) and target == "-":
                    raise  # the reader went away (`| head`): the command exits quietly
                shown = "stdout" if target == "-" else target
                raise EnrichError(f"cannot write {shown}: {exc.strerror or exc}") from exc
    return ExportReport(rows, len(columns), target, fmt)


async def _write_csv(
    cur: psycopg.AsyncServerCursor[Any],
    plan: ExportPlan,
    columns: list[str],
    out: TextSink,
    tick: Callable[[int], None],
    *,
    raw: bool,
) -> int:
    rows = 0
    writer = csv.writer(out, lineterminator="\n")
    quoted = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
    cell = csv_cell if raw else spreadsheet_cell
    header = columns if raw else [neutralise(c) for c in columns]
    (quoted if _needs_quoting(header) else writer).writerow(header)
    async for row in cur:
        cells = [cell(v) for v in row_values(plan, row)]
        (quoted if _needs_quoting(cells) else writer).writerow(cells)
        rows += 1
        if rows % PROGRESS_EVERY == 0:
            tick(rows)
    return rows


async def _write_jsonl(
    cur: psycopg.AsyncServerCursor[Any],
    plan: ExportPlan,
    columns: list[str],
    out: TextSink,
    tick: Callable[[int], None],
) -> int:
    rows = 0
    async for row in cur:
        line = dict(zip(columns, row_values(plan, row), strict=True))
        out.write(json.dumps(line, ensure_ascii=False))
        out.write("\n")
        rows += 1
        if rows % PROGRESS_EVERY == 0:
            tick(rows)
    return rows


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


# Commands ---------------------------------------------------------------------------------------


@click.command("export")
@click.argument("batch_id", metavar="BATCH", type=click.UUID)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, allow_dash=True),
    help="The file to write (replaced atomically), or - for stdout.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "jsonl"]),
    help="Output format (default: jsonl for a .jsonl/.ndjson file, else csv).",
)
@click.option(
    "--status",
    type=click.Choice(["all", "completed", "failed"]),
    default="all",
    show_default=True,
    help="Which items: all, those that completed every step, or those stopped by a failed step.",
)
@click.option(
    "--raw-cells",
    is_flag=True,
    help="CSV: write text exactly as stored, without the quote put before cells a spreadsheet "
    "would run as formulas (= + - @, tab, CR, LF). For programs, not spreadsheets.",
)
def export(
    batch_id: UUID, output: str, fmt: Format | None, status: StatusFilter, raw_cells: bool
) -> None:
    """Write BATCH's items with every step's status, error and result columns, in input order.

    Columns: the input columns, then for each blueprint step <step>.status, <step>.error and one
    <step>.<key> per result key. CSV cells hold strings as they are and other JSON values (numbers,
    lists, objects) as JSON text; JSON lines keep the JSON types, with null where there is nothing.

    CSV is safe to open in a spreadsheet: text starting with = + - @, tab, CR or LF gets a single
    quote in front so it shows as text instead of running as a formula (plain numbers such as -5
    are left alone), and a row with ; or a tab in a cell is fully quoted. --raw-cells turns this
    off.
    """
    err = _stderr()
    chosen: Format = fmt or ("jsonl" if output.lower().endswith(JSONL_SUFFIXES) else "csv")
    try:
        check_output(output)
    except InvalidInput as exc:
        _fail(str(exc), EXIT_BAD_INPUT)

    async def go() -> ExportReport:
        dsn = await resolve_dsn()
        return await export_batch(
            dsn, batch_id, output, fmt=chosen, status=status, console=err, raw_cells=raw_cells
        )

    try:
        report = _run(go)
    except BrokenPipeError:
        # Python's advice: point stdout at /dev/null so the exit flush does not fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    shown = "stdout" if output == "-" else output
    which = "" if status == "all" else f" ({status} items)"
    err.print(
        Text.assemble(
            ("exported ", "green"),
            f"{report.rows:,} row(s){which} x {report.columns} column(s) of batch {batch_id} "
            f"to {shown} ({report.fmt})",
        )
    )


@click.command("retry")
@click.argument("batch_id", metavar="BATCH", type=click.UUID)
@click.option("--step", help="Only this blueprint step's failed rows.")
def retry(batch_id: UUID, step: str | None) -> None:
    """Put BATCH's FAILED rows (cancelled ones included) back to PENDING with fresh attempts.

    Prints the number of rows retried on stdout. The rows run when `enrich run --batch BATCH`
    runs, or by themselves under a running `enrich serve`.
    """

    async def go() -> int:
        api = await PgStateAPI.open(await resolve_dsn(), min_size=1, max_size=1)
        async with api:
            return await api.retry_failed(batch_id, step)

    count = _run(go)
    err = _stderr()
    where = visible(f" at step {step}") if step else ""
    if count == 0:
        err.print(Text(f"nothing to retry: batch {batch_id} has no FAILED rows{where}"))
    else:
        err.print(
            Text.assemble(
                ("retried ", "green"),
                f"{count:,} failed row(s) of batch {batch_id}{where}: they are PENDING again.",
            )
        )
        err.print(
            f"`enrich run --batch {batch_id}` runs them (a running `enrich serve` picks them up "
            "by itself)."
        )
    click.echo(str(count))


@click.command("cancel")
@click.argument("batch_id", metavar="BATCH", type=click.UUID)
def cancel(batch_id: UUID) -> None:
    """Stop BATCH: every unfinished row becomes FAILED ('cancelled'); finished work is kept.

    Prints the number of rows cancelled on stdout. Resume with `enrich retry BATCH`.
    """

    async def go() -> int:
        api = await PgStateAPI.open(await resolve_dsn(), min_size=1, max_size=1)
        async with api:
            return await api.cancel_batch(batch_id)

    count = _run(go)
    err = _stderr()
    if count == 0:
        err.print(f"nothing to cancel: batch {batch_id} has no unfinished rows")
    else:
        err.print(
            Text.assemble(
                ("cancelled ", "yellow"),
                f"{count:,} unfinished row(s) of batch {batch_id}: they are FAILED ('cancelled'); "
                "completed steps and their results are kept.",
            )
        )
        err.print(
            f"resume with `enrich retry {batch_id}` (it also retries rows that failed before), "
            f"then `enrich run --batch {batch_id}`."
        )
    click.echo(str(count))


def register_ops_commands(group: click.Group) -> None:
    """Add ``export``, ``retry`` and ``cancel`` to the ``enrich`` group."""
    group.add_command(export)
    group.add_command(retry)
    group.add_command(cancel)


__all__ = [
    "ExportPlan",
    "ExportReport",
    "StepColumns",
    "build_plan",
    "cancel",
    "check_output",
    "export",
    "export_batch",
    "open_output",
    "register_ops_commands",
    "retry",
    "rows_query",
]
