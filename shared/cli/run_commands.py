"""``enrich run`` (the main job) and ``enrich serve`` (the long-running local service).

``enrich run FILE.csv --steps a,b`` imports the file as a batch and runs it to the end in this
process: the conductor loop woken by the database, a local worker pool, live progress. Ctrl-C (or
SIGTERM) stops cleanly: unfinished rows go back to PENDING with no attempt used, and
``enrich run --batch ID`` resumes. A database restart is ridden out: the run reconnects and goes
on; only a database gone for longer than ``ENRICH_DB_OUTAGE_SECONDS`` ends it, with one line and
the resume command, and so does, at once, the private cluster stopped by ``enrich db down --force``
(the next run takes back at once the rows this one held: their holder is gone). Exit codes: 0
every item completed, 3 the batch finished with failed items, 4 paused by its budget (nothing
else left to run; raise it with ``enrich batch budget``, then ``enrich run --batch ID``), 130
interrupted, 1/2 as the other commands (database problem / bad input).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import click
import psycopg
from rich.console import Console
from rich.live import Live
from rich.text import Text

from shared.callbacks.token import load_keys
from shared.cli.batch_commands import (
    ImportInterrupted,
    _print_import_report,
    _run,
    _stderr,
    budget_option,
    columns_option,
    delimiter_option,
    import_source,
    import_with_progress,
    no_cache_option,
    no_header_option,
    print_progress,
    priority_option,
)
from shared.cli.callbacks import blueprint_has_async_step, callback_receiver
from shared.cli.logs import configure_cli_logging
from shared.cli.progress import RateMeter, format_duration, print_plain, render
from shared.cli.text import literal
from shared.db.connect import resolve_dsn
from shared.db.embedded import EmbeddedPostgres
from shared.errors import ConfigurationError, DatabaseUnavailable, EnrichError
from shared.importer import display_name, parse_steps
from shared.local import LocalRunner
from shared.outage import DatabaseGone
from shared.pg_state import PgStateAPI
from shared.settings import Settings, get_settings
from shared.state_api import BatchProgress, TaskRef
from shared.steps import PREFLIGHTS, Preflight
from shared.steps.base import StepHandler
from shared.steps.plugins import load_handlers

EXIT_FAILED_ITEMS = 3
EXIT_PAUSED = 4
EXIT_INTERRUPTED = 130
EXIT_DATABASE_GONE = 1
PLAIN_PROGRESS_EVERY = 5.0
# How long the summary after a stop may wait for the database.
FINAL_SECONDS = 3.0

TOP_ERRORS = """
select step_name, meta ->> 'error' as error, count(*) as n
from public.workflow_states
where batch_id = %(batch_id)s and status = 'FAILED'
group by 1, 2 order by n desc limit 5
"""

# The registry rows of the steps about to run (a new blueprint, or a resumed batch's).
STEPS_TO_RUN = """
select r.step_name, r.modal_function_name, r.config
from public.enrichment_registry r
where r.step_name = any(%(steps)s::text[])
   or r.step_name in (select jsonb_array_elements_text(b.blueprint) from public.batches b
                      where b.id = %(batch_id)s)
order by r.step_name
"""


def _local_runner(
    dsn: str,
    api: PgStateAPI,
    concurrency: int,
    workers: int,
    handlers: Mapping[str, StepHandler],
    *,
    sweep_interval: float,
    batch_ids: list[UUID] | None = None,
    outage_seconds: float | None = None,
    callback_url: Callable[[TaskRef], str] | None = None,
    stopped_by: Callable[[], str | None] | None = None,
) -> LocalRunner:
    """The pool sized by --concurrency: waves of at most 600 rows in chunks of at most 150, the
    sizes bench/throughput.py found to keep the hand-off short at full throughput."""
    return LocalRunner(
        dsn,
        api,
        batch_ids=batch_ids,
        max_in_flight=concurrency,
        chunk_size=min(150, concurrency),
        claim_limit=min(600, concurrency),
        workers=workers,
        sweep_interval=sweep_interval,
        handlers=handlers,
        outage_seconds=outage_seconds,
        callback_url=callback_url,
        stopped_by=stopped_by,
    )


def _cluster_stopped_by(settings: Settings) -> Callable[[], str | None] | None:
    """For the private cluster: why it is gone for good (stopped by ``enrich db down``), if so."""
    if settings.database_dsn is not None:
        return None
    cluster = EmbeddedPostgres(settings=settings)

    def why() -> str | None:
        by = cluster.stopped_by()
        if by is None:
            return None
        return f"the private PostgreSQL at {cluster.home} was stopped by {by}"

    return why


def _one_line(exc: Exception) -> str:
    """The first line of an error (libpq's messages go on with hints on further lines)."""
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _install_stop_handlers(runner: LocalRunner) -> None:
    """First Ctrl-C / SIGTERM: stop claiming, release unfinished rows, exit. Second: exit now."""
    loop = asyncio.get_running_loop()
    stops = 0

    def on_signal() -> None:
        nonlocal stops
        stops += 1
        if stops > 1:
            raise SystemExit(EXIT_INTERRUPTED)
        _stderr().print("stopping: handing unfinished rows back (Ctrl-C again to force)")
        runner.stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)


async def _progress_or_none(api: PgStateAPI, batch_id: UUID) -> BatchProgress | None:
    """The batch's progress, or None while the database is unreachable (the runner says so)."""
    try:
        return await api.batch_progress(batch_id)
    except DatabaseUnavailable:
        return None


async def _watch(api: PgStateAPI, batch_id: UUID, console: Console, started: float) -> None:
    """Redraw progress every half second (a plain line every few seconds off a terminal)."""
    meter = RateMeter()
    if console.is_terminal:
        with Live(console=console, refresh_per_second=4, transient=True) as live:
            while True:
                shown = await _progress_or_none(api, batch_id)
                if shown is not None:
                    meter.add(shown)
                    live.update(render(shown, meter, time.monotonic() - started))
                await asyncio.sleep(0.5)
    last = 0.0
    while True:
        progress = await _progress_or_none(api, batch_id)
        if progress is None:
            await asyncio.sleep(1.0)
            continue
        meter.add(progress)
        now = time.monotonic()
        if now - last >= PLAIN_PROGRESS_EVERY:
            print_plain(console, progress, meter, now - started)
            last = now
        await asyncio.sleep(1.0)


@dataclass
class RunOutcome:
    """How ``run_batch`` ended. ``progress`` is None when the database could not be asked."""

    progress: BatchProgress | None
    interrupted: bool
    seconds: float
    gone: DatabaseGone | None = None
    paused: bool = False  # held by its budget, with nothing else to run


async def run_batch(
    dsn: str,
    batch_id: UUID,
    *,
    concurrency: int,
    workers: int,
    handlers: Mapping[str, StepHandler],
    console: Console,
    outage_seconds: float | None = None,
    callback_port: int = 0,
    stopped_by: Callable[[], str | None] | None = None,
) -> RunOutcome:
    """Run ``batch_id`` until it finishes, a stop signal, or the database stays away too long.
    A blueprint with an ASYNC step gets a callback receiver on 127.0.0.1:``callback_port`` (0: any
    free port)."""
    api = await PgStateAPI.open(dsn, max_size=workers + 4)
    async with api, contextlib.AsyncExitStack() as stack:
        callback_url = None
        if await blueprint_has_async_step(dsn, batch_id):
            callback_url = await stack.enter_async_context(
                callback_receiver(api, get_settings(), port=callback_port)
            )
        runner = _local_runner(
            dsn,
            api,
            concurrency,
            workers,
            handlers,
            sweep_interval=1.0,
            batch_ids=[batch_id],
            outage_seconds=outage_seconds,
            callback_url=callback_url,
            stopped_by=stopped_by,
        )
        _install_stop_handlers(runner)
        started = time.monotonic()
        finished = False
        paused = False
        gone: DatabaseGone | None = None

        async def until() -> bool:
            nonlocal finished, paused
            progress = await api.batch_progress(batch_id)
            finished, paused = progress.finished, progress.paused
            return finished or paused

        watcher = asyncio.create_task(_watch(api, batch_id, console, started))
        try:
            await runner.run(until=until)
        except DatabaseGone as exc:
            gone = exc
        finally:
            watcher.cancel()
            await asyncio.wait({watcher})
        progress = None
        if gone is None and not runner.outage.ongoing:
            # Interrupted while the database is away: stop now, without a summary.
            with contextlib.suppress(asyncio.TimeoutError):
                progress = await asyncio.wait_for(_progress_or_none(api, batch_id), FINAL_SECONDS)
        return RunOutcome(
            progress, not (finished or paused), time.monotonic() - started, gone, paused
        )


async def preflight(
    dsn: str,
    steps: Sequence[str] = (),
    batch_id: UUID | None = None,
    checks: Mapping[str, Preflight] = PREFLIGHTS,
) -> None:
    """Run the preflight check of each step to be run (``steps``, or ``batch_id``'s blueprint)
    with its registry config, before anything is imported or claimed: a missing setting (a Clay
    webhook URL) is one ``ConfigurationError`` naming the step, not a failed row per item.
    Unknown steps are left to the import, which refuses them with its own message."""
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(STEPS_TO_RUN, {"steps": list(steps), "batch_id": batch_id})
        rows = await cur.fetchall()
    for step_name, function_name, config in rows:
        check = checks.get(function_name)
        if check is None:
            continue
        try:
            check(config or {})
        except ConfigurationError as exc:
            raise ConfigurationError(f"step {step_name}: {exc}") from None


async def _top_errors(dsn: str, batch_id: UUID) -> list[dict[str, Any]]:
    """The most common errors of the batch's failed rows; none if the database cannot say."""
    try:
        async with await psycopg.AsyncConnection.connect(
            dsn, autocommit=True, connect_timeout=int(FINAL_SECONDS)
        ) as conn:
            cur = conn.cursor(row_factory=psycopg.rows.dict_row)
            await cur.execute(TOP_ERRORS, {"batch_id": batch_id})
            return await cur.fetchall()
    except psycopg.OperationalError:
        return []


def _check_run_arguments(
    file: Path | None,
    steps: str | None,
    batch_id: UUID | None,
    *,
    no_cache: bool,
    priority: int,
    import_options: bool,
) -> None:
    """A new batch (FILE and --steps) or a resumed one (--batch), with only the options that fit."""
    if (file is None) == (batch_id is None):
        raise click.UsageError("give either FILE.csv with --steps, or --batch ID to resume")
    if file is not None and not steps:
        raise click.UsageError("--steps is required with FILE.csv (e.g. --steps normalize_domain)")
    if batch_id is None:
        return
    if steps:
        raise click.UsageError("--steps belongs to a new batch; --batch resumes with its own")
    if no_cache:
        raise click.UsageError("--no-cache belongs to a new batch")
    if priority:
        raise click.UsageError("--priority belongs to a new batch")
    if import_options:
        raise click.UsageError("--delimiter, --no-header and --columns belong to a new batch")


def _report_outcome(
    err: Console, target: UUID, outcome: RunOutcome, errors: list[dict[str, Any]]
) -> None:
    """The run's last lines, the batch id on stdout and the documented exit code."""
    resume = f"resume with: enrich run --batch {target}"
    if outcome.gone is not None:
        err.print(
            Text.assemble(
                ("error: ", "bold red"), f"{_one_line(outcome.gone)}; nothing is lost, {resume}"
            )
        )
        click.echo(str(target))
        sys.exit(EXIT_DATABASE_GONE)
    progress, interrupted, seconds = outcome.progress, outcome.interrupted, outcome.seconds
    if progress is None:
        err.print(Text.assemble(("stopped ", "yellow"), "(the database did not answer). ", resume))
        click.echo(str(target))
        sys.exit(EXIT_INTERRUPTED)
    print_progress(err, progress)
    done = progress.items_completed + progress.items_failed
    rate = sum(c["COMPLETED"] for c in progress.steps.values()) / seconds if seconds > 0 else 0.0
    err.print(
        f"{done:,}/{progress.items:,} items finished in {format_duration(seconds)} "
        f"({rate:,.0f} steps/s)"
    )
    if outcome.paused:
        err.print(
            Text.assemble(("paused: ", "bold yellow"), progress.cost.paused_reason or "budget")
        )
        err.print(
            f"raise the budget and resume with: enrich batch budget {target} --usd N && "
            f"enrich run --batch {target}   (or: enrich run --batch {target} --budget-usd N)"
        )
        click.echo(str(target))
        sys.exit(EXIT_PAUSED)
    if interrupted:
        err.print(Text.assemble(("stopped. ", "yellow"), resume))
        click.echo(str(target))
        sys.exit(EXIT_INTERRUPTED)
    if progress.items_failed:
        err.print(
            Text(f"{progress.items_failed:,} item(s) failed. Most common errors:", style="red")
        )
        for row in errors:
            err.print(literal(f"  {row['n']:>6,} x {row['step_name']}: {row['error']}"))
        err.print(
            f"retry them with: enrich retry {target} && enrich run --batch {target}\n"
            f"export results with: enrich export {target} -o results.csv"
        )
        click.echo(str(target))
        sys.exit(EXIT_FAILED_ITEMS)
    err.print(
        Text.assemble(("done. ", "green"), f"export with: enrich export {target} -o results.csv")
    )
    click.echo(str(target))


@click.command("run")
@click.argument(
    "file", required=False, type=click.Path(dir_okay=False, allow_dash=True, path_type=Path)
)
@click.option(
    "--steps",
    metavar="STEP[,STEP...]",
    help="The blueprint, e.g. normalize_domain,clean_company_name.",
)
@click.option("--batch", "batch_id", type=click.UUID, help="Resume an existing batch instead.")
@click.option(
    "--concurrency",
    type=click.IntRange(1, 100_000),
    default=600,
    show_default=True,
    help="Rows in flight at once in the local worker pool.",
)
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option("--name", help="A name for the batch (default: the file name).")
@click.option("--client-id", type=click.UUID, help="Owner of the batch (default ENRICH_CLIENT_ID).")
@click.option("--skip-invalid", is_flag=True, help="Import valid rows, report malformed ones.")
@delimiter_option
@no_header_option
@columns_option
@click.option(
    "--callback-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Port of the ASYNC steps' callback receiver on 127.0.0.1 (0: any free port); fix it to "
    "forward a tunnel to it, with ENRICH_CALLBACK_BASE_URL set to the tunnel's URL.",
)
@budget_option
@no_cache_option
@priority_option
def run(
    file: Path | None,
    steps: str | None,
    batch_id: UUID | None,
    concurrency: int,
    workers: int,
    name: str | None,
    client_id: UUID | None,
    skip_invalid: bool,
    delimiter: str | None,
    no_header: bool,
    columns: str | None,
    callback_port: int,
    budget_usd: float | None,
    no_cache: bool,
    priority: int,
) -> None:
    """Import FILE.csv (- reads standard input) as a batch running --steps and run it to the
    end, here and now.

    No configuration needed: without DATABASE_URL a private PostgreSQL is started. Resume a
    stopped batch with --batch ID. Exits 0 when every item completed, 3 when some failed.
    """
    _check_run_arguments(
        file,
        steps,
        batch_id,
        no_cache=no_cache,
        priority=priority,
        import_options=bool(delimiter or no_header or columns),
    )
    sep, columns = import_source(file, delimiter, no_header, columns) if file else (None, None)
    settings = get_settings()
    err = _stderr()
    configure_cli_logging(settings.log_level)

    async def go() -> tuple[UUID, RunOutcome, list[dict[str, Any]]]:
        handlers = load_handlers(settings.step_modules)
        if settings.callback_secret or settings.callback_secret_previous:
            load_keys(settings)  # a bad key is refused before anything is imported
        dsn = await resolve_dsn()
        # Before the import: a batch that cannot run is not written at all.
        await preflight(dsn, parse_steps(steps) if steps else (), batch_id)
        target = batch_id
        if file is not None:
            report = await import_with_progress(
                err,
                dsn,
                file,
                steps or "",
                client_id=client_id if client_id is not None else settings.client_id,
                name=name or display_name(file),
                skip_invalid=skip_invalid,
                delimiter=sep,
                budget_usd=budget_usd,
                use_cache=not no_cache,
                columns=columns,
                priority=priority,
            )
            _print_import_report(err, file, report)
            target = report.batch_id
            err.print(Text.assemble(("batch ", "bold"), str(target)))
        elif budget_usd is not None:  # resuming with a new budget
            assert batch_id is not None
            async with await PgStateAPI.open(dsn, min_size=1, max_size=1) as budget_api:
                await budget_api.set_budget(batch_id, budget_usd)
        assert target is not None
        try:
            outcome = await run_batch(
                dsn,
                target,
                concurrency=concurrency,
                workers=workers,
                handlers=handlers,
                console=err,
                outage_seconds=settings.db_outage_seconds,
                callback_port=callback_port,
                stopped_by=_cluster_stopped_by(settings),
            )
        except ConfigurationError as exc:  # the callback port, say: the batch is safe
            raise ConfigurationError(
                f"{exc}; then resume with: enrich run --batch {target}"
            ) from exc
        except (asyncio.CancelledError, KeyboardInterrupt):
            # Ctrl-C before the run's own stop handler was in place (it was connecting).
            raise ImportInterrupted(
                f"interrupted before the run started; resume with: enrich run --batch {target}",
                target,
            ) from None
        failed = outcome.progress is not None and outcome.progress.items_failed
        errors = await _top_errors(dsn, target) if failed else []
        return target, outcome, errors

    _report_outcome(err, *_run(go))


@click.command("serve")
@click.option("--concurrency", type=click.IntRange(1, 100_000), default=600, show_default=True)
@click.option("--workers", type=click.IntRange(1, 64), default=4, show_default=True)
@click.option(
    "--sweep-interval",
    type=click.FloatRange(0.1, 3600),
    default=5.0,
    show_default=True,
    help="Seconds between sweeps for expired leases and due retries.",
)
@click.option(
    "--callback-port",
    type=click.IntRange(0, 65535),
    default=8787,
    show_default=True,
    help="Port of the callback receiver of ASYNC steps, on 127.0.0.1 (0: any free port).",
)
def serve(concurrency: int, workers: int, sweep_interval: float, callback_port: int) -> None:
    """Conductor loop and local workers as a service: runs every batch, created by any means
    (Supabase Studio, psql, enrich batch create), until Ctrl-C or SIGTERM."""
    settings = get_settings()
    err = _stderr()
    configure_cli_logging(settings.log_level)

    async def go() -> None:
        handlers = load_handlers(settings.step_modules)
        dsn = await resolve_dsn()
        api = await PgStateAPI.open(dsn, max_size=workers + 4)
        async with api, callback_receiver(api, settings, port=callback_port) as callback_url:
            runner = _local_runner(
                dsn,
                api,
                concurrency,
                workers,
                handlers,
                sweep_interval=sweep_interval,
                callback_url=callback_url,
                stopped_by=_cluster_stopped_by(settings),
            )
            _install_stop_handlers(runner)
            err.print(f"serving: {workers} workers, {concurrency} rows in flight; Ctrl-C to stop")
            reporter = asyncio.create_task(_report(runner, err))
            try:
                await runner.run()
            except DatabaseGone as exc:
                gone = f"{_one_line(exc)}; nothing is lost, start again with: enrich serve"
                raise EnrichError(gone) from None
            finally:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
            pool = runner.dispatcher.stats
            err.print(
                f"stopped: {runner.stats.passes} passes, {pool.completed:,} completed, "
                f"{pool.retried:,} retried, {pool.failed:,} failed, {pool.released:,} released"
            )

    _run(go)


async def _report(runner: LocalRunner, console: Console) -> None:
    """A line every 10 s while rows move, so a service log shows progress."""
    last = (-1, -1)
    while True:
        await asyncio.sleep(10)
        pool = runner.dispatcher.stats
        now = (pool.completed, pool.failed)
        if now != last:
            console.print(
                f"claimed {runner.stats.claimed:,}  completed {pool.completed:,}  "
                f"retried {pool.retried:,}  failed {pool.failed:,}  in flight "
                f"{runner.dispatcher.in_flight:,}",
                highlight=False,
            )
            last = now


def register_run_commands(group: click.Group) -> None:
    group.add_command(run)
    group.add_command(serve)
