"""``enrich batch create|list`` and ``enrich status``: batches from the command line.

Output conventions: what a script consumes goes to stdout (the new batch id, alone on the last line;
``--json`` documents), everything for a human reading along (header mapping, warnings, progress)
goes to stderr. Exit codes: 0 success, 1 an unknown batch or a database problem, 2 bad input (a bad
CSV, an unknown step, an invalid UUID, a missing or bad setting), with nothing written, 130
interrupted (Ctrl-C or SIGTERM), with one line saying what was written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TypeVar
from uuid import UUID

import click
import psycopg
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from shared.cli.progress import cell as progress_cell
from shared.cli.progress import columns as progress_columns
from shared.cli.progress import cost_line, usd_text
from shared.cli.text import literal, visible
from shared.db.connect import resolve_dsn
from shared.errors import ConfigurationError, EnrichError, InvalidInput, NotFound
from shared.importer import (
    DELIMITER_NAMES,
    STDIN,
    ImportProgress,
    ImportReport,
    display_name,
    import_csv,
)
from shared.pg_state import PgStateAPI, translate_db_error
from shared.settings import get_settings
from shared.state_api import BatchProgress, BudgetState

T = TypeVar("T")

EXIT_NOT_FOUND = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SHOW_SKIPPED = 20
# Files above this size get a live progress bar (on a terminal).
PROGRESS_BAR_BYTES = 2_000_000

# Recent batches with their counts. Every item has exactly one "frontier" row (its active step, its
# FAILED step, or its COMPLETED last step), so completed = items - active - failed, and both counts
# use the partial indexes of workflow_states: no scan of a million-row batch.
LIST_BATCHES = """
select b.id, b.name, b.status::text as status, b.item_count, b.blueprint, b.created_at,
       b.cancelled_at is not null as cancelled,
       (select count(*) from public.workflow_states ws
        where ws.batch_id = b.id and ws.status in ('PENDING', 'QUEUED', 'IN_PROGRESS')) as active,
       (select count(*) from public.workflow_states ws
        where ws.batch_id = b.id and ws.status = 'FAILED') as failed
from public.batches b
where %(client_id)s::uuid is null or b.client_id = %(client_id)s::uuid
order by b.created_at desc, b.id
limit %(limit)s
"""


# markup=False: styles come from Text objects only, so a string holding a user's text (a step's
# error, a file name) is never parsed as Rich markup ("[/x]" would raise MarkupError).
def _stderr() -> Console:
    return _uncut(Console(stderr=True, highlight=False, soft_wrap=True, markup=False))


def _stdout() -> Console:
    return _uncut(Console(highlight=False, markup=False))


def _uncut(console: Console) -> Console:
    if not console.is_terminal:
        console.width = 200  # piped or redirected: never truncate ids or tables to 80 columns
    return console


def _fail(message: str, code: int) -> NoReturn:
    _stderr().print(Text.assemble(("error: ", "bold red"), visible(message)))
    sys.exit(code)


class ImportInterrupted(Exception):
    """A stop signal ended an import; the message says whether the batch was committed."""

    def __init__(self, message: str, batch_id: UUID | None = None) -> None:
        super().__init__(message)
        self.batch_id = batch_id


def _fail_with(exc: EnrichError) -> NoReturn:
    """One line and the documented exit code for one of the project's errors."""
    if isinstance(exc, InvalidInput):
        _fail(str(exc), EXIT_BAD_INPUT)
    if isinstance(exc, ConfigurationError):  # a bad setting is bad input too, as in `enrich`
        _fail(f"{type(exc).__name__}: {exc}", EXIT_BAD_INPUT)
    if isinstance(exc, NotFound):
        _fail(str(exc), EXIT_NOT_FOUND)
    # The base class says nothing the message does not; a subclass names the kind of trouble.
    kind = "" if type(exc) is EnrichError else f"{type(exc).__name__}: "
    _fail(f"{kind}{exc}", 1)


def _run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; show the project's errors as one message with the documented exit code.

    A database error counts as the project's error it translates to (an unknown batch exits 1, a
    refused argument 2), whichever layer raised it. Ctrl-C exits 130 with one line.
    """
    try:
        return asyncio.run(coro_fn())
    except ImportInterrupted as exc:
        _stderr().print(literal(str(exc), style="yellow"))
        if exc.batch_id is not None:
            click.echo(str(exc.batch_id))
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        _stderr().print(Text("interrupted", style="yellow"))
        sys.exit(EXIT_INTERRUPTED)
    except EnrichError as exc:
        _fail_with(exc)
    except psycopg.Error as exc:
        _fail_with(translate_db_error(exc))


async def _dsn() -> str:
    return await resolve_dsn()


# enrich batch ... ---------------------------------------------------------------------------------

budget_option = click.option(
    "--budget-usd",
    type=click.FloatRange(min=0),
    metavar="USD",
    help="Stop claiming paid calls once the batch spent this much (raise it with "
    "`enrich batch budget`).",
)
no_cache_option = click.option(
    "--no-cache",
    is_flag=True,
    help="Call paid providers even for inputs the result cache has an answer for.",
)
priority_option = click.option(
    "--priority",
    type=click.IntRange(-1000, 1000),
    default=0,
    show_default=True,
    help="Orders this batch among your own batches: higher runs first, equal ones take turns "
    "(other clients are served in turn whatever it is).",
)
# The CSV file to import; "-" reads it from standard input.
csv_file_argument = click.argument(
    "file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path)
)
delimiter_option = click.option(
    "--delimiter",
    type=click.Choice(["comma", "semicolon", "tab", "pipe"]),
    help="Field separator (default: sniffed from the file).",
)
no_header_option = click.option(
    "--no-header",
    is_flag=True,
    help="The file has no header row: its first line is a company. Name the columns with "
    "--columns.",
)
columns_option = click.option(
    "--columns",
    metavar="NAME[,NAME...]",
    help="With --no-header: the columns' names, in order (e.g. name,website).",
)


def import_source(
    file: Path, delimiter: str | None, no_header: bool, columns: str | None
) -> tuple[str | None, str | None]:
    """The checked --delimiter character and --columns of an import, or a usage error."""
    if no_header and not columns:
        raise click.UsageError(
            "--no-header needs --columns to name the columns, in order (e.g. name,website)"
        )
    if columns and not no_header:
        raise click.UsageError(
            "--columns names the columns of a file without a header row: add --no-header"
        )
    if str(file) == STDIN and sys.stdin.isatty():
        raise click.UsageError(
            "'-' reads the CSV from standard input, and nothing is piped in: "
            "e.g. cat companies.csv | enrich batch create - --steps ..."
        )
    sep = {v: k for k, v in DELIMITER_NAMES.items()}.get(delimiter) if delimiter else None
    return sep, columns


@click.group("batch")
def batch() -> None:
    """Batches: create one from a CSV file, list recent ones."""


@batch.command("create")
@csv_file_argument
@click.option(
    "--steps",
    required=True,
    metavar="STEP[,STEP...]",
    help="The blueprint: registered steps to run on every row, in order.",
)
@click.option("--client-id", type=click.UUID, help="Owner of the batch (default ENRICH_CLIENT_ID).")
@click.option("--name", help="A name for the batch (default: the file name).")
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Import the valid rows and report malformed ones (default: refuse the whole file).",
)
@delimiter_option
@no_header_option
@columns_option
@budget_option
@no_cache_option
@priority_option
def batch_create(
    file: Path,
    steps: str,
    client_id: UUID | None,
    name: str | None,
    skip_invalid: bool,
    delimiter: str | None,
    no_header: bool,
    columns: str | None,
    budget_usd: float | None,
    no_cache: bool,
    priority: int,
) -> None:
    """Create a batch from FILE.csv (- reads standard input): one item per row, each starting
    the blueprint.

    Prints the batch id on stdout (alone on the last line); the header mapping, warnings and
    skipped rows go to stderr. Nothing is written when the file or the steps are refused.
    """
    err = _stderr()
    sep, columns = import_source(file, delimiter, no_header, columns)
    owner = client_id if client_id is not None else get_settings().client_id

    async def go() -> ImportReport:
        return await import_with_progress(
            err,
            await _dsn(),
            file,
            steps,
            client_id=owner,
            name=name or display_name(file),
            skip_invalid=skip_invalid,
            delimiter=sep,
            budget_usd=budget_usd,
            use_cache=not no_cache,
            columns=columns,
            priority=priority,
        )

    report = _run(go)
    _print_import_report(err, file, report)
    click.echo(str(report.batch_id))


async def import_with_progress(
    err: Console,
    dsn: str,
    file: Path,
    steps: str,
    *,
    client_id: UUID | None,
    name: str,
    skip_invalid: bool,
    delimiter: str | None = None,
    budget_usd: float | None = None,
    use_cache: bool = True,
    columns: str | None = None,
    priority: int = 0,
) -> ImportReport:
    """import_csv, with a progress bar on a terminal for files large enough to take a while.

    Ctrl-C or SIGTERM stops the import and raises ``ImportInterrupted``: see ``_import_or_stop``.
    """
    try:
        size = 0 if str(file) == STDIN else file.stat().st_size
    except OSError:
        size = 0
    with contextlib.ExitStack() as stack:
        on_progress: Callable[[ImportProgress], None] | None = None
        if err.is_terminal and size >= PROGRESS_BAR_BYTES:
            bar = stack.enter_context(
                Progress(
                    TextColumn("importing {task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("bytes"),
                    TimeElapsedColumn(),
                    console=err,
                    transient=True,
                )
            )
            task = bar.add_task(file.name, total=size)

            def on_progress(p: ImportProgress) -> None:
                bar.update(task, completed=p.bytes_read)

        return await _import_or_stop(
            dsn,
            file,
            steps,
            client_id=client_id,
            name=name,
            skip_invalid=skip_invalid,
            delimiter=delimiter,
            progress=on_progress,
            budget_usd=budget_usd,
            use_cache=use_cache,
            columns=columns,
            priority=priority,
        )


@dataclass
class _StopRequest:
    signal: int | None = None  # the first stop signal received
    committing: bool = False  # the rows are in: let the commit finish
    over: bool = False  # the import ended: a late cancel would hit the caller


async def _import_or_stop(
    dsn: str,
    file: Path,
    steps: str,
    *,
    client_id: UUID | None,
    name: str,
    skip_invalid: bool,
    delimiter: str | None,
    progress: Callable[[ImportProgress], None] | None,
    budget_usd: float | None = None,
    use_cache: bool = True,
    columns: str | None = None,
    priority: int = 0,
) -> ImportReport:
    """import_csv in a transaction of our own, so that a stop signal is reported truthfully.

    The import runs in a savepoint of this transaction, and only this function commits. A first
    Ctrl-C or SIGTERM while rows stream cancels the import: the transaction was never committed,
    so nothing was imported. One that arrives once the rows are in lets the commit finish (it is
    short), and the message names the batch it committed. Either way ``ImportInterrupted`` is
    raised. A second signal ends the process at once, with that line.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    stop = _StopRequest()

    def cancel_unless_committing() -> None:
        if not stop.committing and not stop.over:
            task.cancel()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.signal is not None:
            # Forced: the cleanup waits for a database that does not answer. Leave now; the
            # server rolls back a transaction whose connection is gone without a COMMIT.
            message = (
                "interrupted while committing the import: `enrich batch list` shows whether "
                "the batch is there"
                if stop.committing
                else "interrupted: nothing was imported"
            )
            # A live progress bar hid the cursor: show it again.
            show_cursor = "\x1b[?25h\n" if os.isatty(sys.stderr.fileno()) else ""
            os.write(sys.stderr.fileno(), f"{show_cursor}{message}\n".encode())
            os._exit(EXIT_INTERRUPTED)
        stop.signal = signum
        loop.call_soon_threadsafe(cancel_unless_committing)

    report: ImportReport | None = None
    with _signal_handlers(on_signal):
        try:
            try:
                conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            except psycopg.Error as exc:
                raise translate_db_error(exc) from exc
            async with conn, conn.transaction():
                report = await import_csv(
                    conn,
                    file,
                    steps,
                    client_id=client_id,
                    name=name,
                    skip_invalid=skip_invalid,
                    delimiter=delimiter,
                    progress=progress,
                    progress_every=20_000,
                    budget_usd=budget_usd,
                    use_cache=use_cache,
                    columns=columns,
                    priority=priority,
                )
                stop.committing = True
        except BaseException:
            if stop.signal is None or stop.committing:
                raise  # not ours: a failure of its own (a failed commit included)
            _uncancel(task)
            raise ImportInterrupted("interrupted: nothing was imported") from None
        finally:
            stop.over = True
    assert report is not None
    if stop.signal is not None:
        raise ImportInterrupted(
            f"interrupted after the import committed: batch {report.batch_id} holds "
            f"{report.rows_imported:,} item(s); run it with: enrich run --batch {report.batch_id}",
            report.batch_id,
        )
    return report


def _uncancel(task: asyncio.Task[Any]) -> None:
    """Take back our own ``task.cancel()`` (Python 3.11+ counts them), so that an enclosing
    ``asyncio.timeout`` or TaskGroup does not take it for theirs."""
    cancelling = getattr(task, "cancelling", None)
    if cancelling is not None and cancelling():
        task.uncancel()  # type: ignore[attr-defined,unused-ignore]


@contextlib.contextmanager
def _signal_handlers(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM meanwhile, then the previous handlers back.

    A signal ignored when we start (a background job's SIGINT) stays ignored, and one whose
    handler was not set from Python is left alone (it could not be put back). Only the main
    thread may set handlers: elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {
        sig: before
        for sig in STOP_SIGNALS
        if (before := signal.getsignal(sig)) is not None and before is not signal.SIG_IGN
    }
    try:
        for sig in previous:
            signal.signal(sig, handler)
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def _print_import_report(err: Console, file: Path, report: ImportReport) -> None:
    notes = [f"delimiter: {DELIMITER_NAMES.get(report.delimiter, report.delimiter)}"]
    if report.bom:
        notes.append("UTF-8 BOM stripped")
    err.print(literal(f"{display_name(file)} ({', '.join(notes)})", style="bold"))
    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("column")
    table.add_column("key")
    table.add_column("")
    for col in report.headers.columns:
        mapped = "mapped" if col.mapped else "unmapped (kept as is)"
        table.add_row(literal(col.header), literal(col.key), mapped)
    err.print(table)
    for warning in report.warnings:
        err.print(Text.assemble(("warning: ", "yellow"), warning))
    spanning = (
        f" on {report.lines_skipped:,} lines" if report.lines_skipped > report.rows_skipped else ""
    )
    if report.skipped:
        err.print(Text(f"skipped rows ({report.rows_skipped}{spanning}):", style="yellow"))
        for bad in report.skipped[:SHOW_SKIPPED]:
            err.print(Text(f"  {bad}"))
        if report.rows_skipped > SHOW_SKIPPED:
            err.print(Text(f"  ... and {report.rows_skipped - SHOW_SKIPPED} more"))
    blank = f", {report.blank_lines} blank line(s) ignored" if report.blank_lines else ""
    err.print(
        Text.assemble(
            ("imported ", "green"),
            f"{report.rows_imported:,} row(s)",
            f", {report.rows_skipped:,} skipped{spanning}{blank}; "
            f"steps: {' -> '.join(report.steps)} ({report.seconds:.1f}s)",
        )
    )


@batch.command("list")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--client-id", type=click.UUID, help="Only this client's batches.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array on stdout.")
def batch_list(limit: int, client_id: UUID | None, as_json: bool) -> None:
    """Recent batches, newest first, with their status and counts."""

    async def go() -> list[dict[str, Any]]:
        dsn = await _dsn()
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            await cur.execute(LIST_BATCHES, {"limit": limit, "client_id": client_id})
            return await cur.fetchall()

    rows = _run(go)
    batches = [_batch_summary(row) for row in rows]
    if as_json:
        click.echo(json.dumps(batches, indent=2))
        return
    if not batches:
        _stderr().print(
            "no batches yet: create one with `enrich batch create FILE.csv --steps ...`"
        )
        return
    table = Table(header_style="bold")
    for heading in ("batch", "name", "status", "items", "completed", "failed", "steps", "created"):
        numeric = heading in ("items", "completed", "failed")
        table.add_column(heading, justify="right" if numeric else "left")
    for b in batches:
        status = b["status"] + (" (cancelled)" if b["cancelled"] else "")
        table.add_row(
            b["batch_id"],
            literal(b["name"] or ""),
            Text(status, style=_STATUS_STYLE.get(b["status"], "")),
            f"{b['items']:,}",
            f"{b['completed']:,}",
            f"{b['failed']:,}",
            literal(",".join(b["steps"])),
            b["created_at"][:16].replace("T", " "),
        )
    _stdout().print(table)


@batch.command("budget")
@click.argument("batch_id", metavar="BATCH", type=click.UUID)
@click.option("--usd", type=click.FloatRange(min=0), metavar="USD", help="The new budget, in USD.")
@click.option("--none", "unlimited", is_flag=True, help="Remove the budget: no limit.")
def batch_budget(batch_id: UUID, usd: float | None, unlimited: bool) -> None:
    """Set what BATCH may spend on paid providers. A budget above what it spent resumes a batch
    paused by its budget (a running `enrich serve` picks it up at once)."""
    if (usd is None) == (not unlimited):
        raise click.UsageError("give either --usd N or --none")

    async def go() -> BudgetState:
        api = await PgStateAPI.open(await _dsn(), min_size=1, max_size=1)
        async with api:
            return await api.set_budget(batch_id, usd)

    state = _run(go)
    err = _stderr()
    budget = "no budget" if state.budget_usd is None else f"budget {usd_text(state.budget_usd)}"
    err.print(f"batch {batch_id}: {budget}, {usd_text(state.spent_usd)} spent")
    if state.paused_reason:
        err.print(Text.assemble(("still paused: ", "yellow"), visible(state.paused_reason)))
    else:
        err.print(
            f"paid rows are claimed again: `enrich run --batch {batch_id}` runs them (a running "
            "`enrich serve` picks them up by itself)."
        )
    click.echo(json.dumps(_budget_json(state)))


def _budget_json(state: BudgetState) -> dict[str, Any]:
    return {
        "batch_id": str(state.batch_id),
        "budget_usd": state.budget_usd,
        "spent_usd": state.spent_usd,
        "paused_reason": state.paused_reason,
    }


def _batch_summary(row: dict[str, Any]) -> dict[str, Any]:
    items = int(row["item_count"])
    active = int(row["active"])
    failed = int(row["failed"])
    created: datetime = row["created_at"]
    return {
        "batch_id": str(row["id"]),
        "name": row["name"],
        "status": row["status"],
        "items": items,
        "completed": max(items - active - failed, 0),
        "failed": failed,
        "steps": list(row["blueprint"]),
        "cancelled": bool(row["cancelled"]),
        "created_at": created.isoformat(),
    }


_STATUS_STYLE = {"PENDING": "", "IN_PROGRESS": "cyan", "COMPLETED": "green", "FAILED": "red"}


# enrich status ------------------------------------------------------------------------------------


@click.command("status")
@click.argument("batch_id", metavar="BATCH", type=click.UUID)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON on stdout.")
def status(batch_id: UUID, as_json: bool) -> None:
    """Progress of BATCH: counts per blueprint step and status."""

    async def go() -> BatchProgress:
        return await fetch_progress(await _dsn(), batch_id)

    progress = _run(go)
    if as_json:
        click.echo(json.dumps(progress.to_json()))
        return
    print_progress(_stdout(), progress)


async def fetch_progress(dsn: str, batch_id: UUID) -> BatchProgress:
    api = await PgStateAPI.open(dsn, min_size=1, max_size=1)
    async with api:
        return await api.batch_progress(batch_id)


def print_progress(console: Console, progress: BatchProgress) -> None:
    """The human view of ``enrich status``: a header line and one table row per step."""
    name = f" {progress.name!r}" if progress.name else ""
    status_text = progress.status + (" (cancelled)" if progress.cancelled else "")
    console.print(
        Text.assemble(
            ("batch ", "bold"),
            (str(progress.batch_id), "bold"),
            name,
            ": ",
            (status_text, _STATUS_STYLE.get(progress.status, "")),
        )
    )
    console.print(
        f"items {progress.items:,}  completed {progress.items_completed:,}  "
        f"failed {progress.items_failed:,}"
    )
    spend = cost_line(progress)
    if spend is not None:
        console.print(spend)
    # Without borders all eight columns fit an 80-column terminal with nothing cut; the step name
    # is what the reader looks for, so it is the last thing that would be.
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, padding=0)
    table.add_column("step", min_width=max(map(len, progress.steps), default=4), no_wrap=True)
    shown = progress_columns(progress)
    for s in shown:
        table.add_column(s, justify="right")
    for step in progress.steps:
        table.add_row(step, *(f"{progress_cell(progress, step, s):,}" for s in shown))
    # A pipe or a CI log has no edge to fit: rich's 80 columns there would cut headers.
    console.print(table)


def register_batch_commands(group: click.Group) -> None:
    """Add ``batch`` and ``status`` to the ``enrich`` group."""
    group.add_command(batch)
    group.add_command(status)


__all__ = [
    "ImportInterrupted",
    "batch",
    "budget_option",
    "columns_option",
    "csv_file_argument",
    "delimiter_option",
    "fetch_progress",
    "import_source",
    "import_with_progress",
    "no_cache_option",
    "no_header_option",
    "print_progress",
    "priority_option",
    "register_batch_commands",
    "status",
]
