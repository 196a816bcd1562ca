"""``enrich``: the command line. For now only ``enrich db up|status|down``."""

from __future__ import annotations

import asyncio
import os
import sys

import click
import psycopg

from shared.cli.batch_commands import register_batch_commands
from shared.cli.dev_commands import register_dev_commands
from shared.cli.errors import friendly_errors
from shared.cli.ops_commands import register_ops_commands
from shared.cli.run_commands import register_run_commands
from shared.db.clients import APP_NAME_ENV, app_name, connected_clients, in_use_message
from shared.db.connect import check_reachable, take_started_clusters
from shared.db.embedded import EmbeddedPostgres
from shared.db.migrate import migrate_sync
from shared.db.migrate import status as migration_status
from shared.errors import ConfigurationError
from shared.settings import get_settings


@click.group()
@click.version_option(package_name="enrich-orchestrator")
@click.pass_context
def main(ctx: click.Context) -> None:
    """Data-enrichment orchestrator: PostgreSQL is the source of truth."""
    _name_connections(ctx)
    take_started_clusters()  # only what this command starts is reported at its end
    # `enrich dev up` leaves the parts running too: `enrich dev down --all` stops them all.
    stop = "enrich dev down --all" if ctx.invoked_subcommand == "dev" else "enrich db down"
    ctx.call_on_close(lambda: _say_cluster_left_running(stop))
    # Read the settings once, here: a bad variable is one line and exit 2, before any command
    # does anything, rather than a traceback from whichever command reads them first.
    try:
        get_settings()
    except ConfigurationError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


def _name_connections(ctx: click.Context) -> None:
    """Every connection of this command is ``enrich <command> (pid N)`` in pg_stat_activity,
    so ``enrich db down`` can tell who would be cut off (libpq reads PGAPPNAME at connect)."""
    previous = os.environ.get(APP_NAME_ENV)
    os.environ[APP_NAME_ENV] = app_name(ctx.invoked_subcommand or "")

    def restore() -> None:  # for callers that invoke the CLI in-process (tests)
        if previous is None:
            os.environ.pop(APP_NAME_ENV, None)
        else:
            os.environ[APP_NAME_ENV] = previous

    ctx.call_on_close(restore)


def _say_cluster_left_running(stop: str) -> None:
    """Once, at the end of a command that started the private cluster: it is still running."""
    for cluster in take_started_clusters():
        if cluster.status().running:
            click.echo(
                f"the private PostgreSQL at {cluster.home} stays running for the next command; "
                f"stop it with `{stop}`",
                err=True,
            )


@main.group()
def db() -> None:
    """The database: the private cluster (default) or DATABASE_URL."""


@db.command("up")
@friendly_errors
def db_up() -> None:
    """Start the private cluster (unless DATABASE_URL is set) and apply pending migrations."""
    settings = get_settings()
    dsn = settings.database_dsn
    if dsn is None:
        cluster = EmbeddedPostgres(settings=settings)
        dsn = cluster.start(repair=True)
        if cluster.restarted_because is not None:
            click.echo(f"private cluster restarted: {cluster.restarted_because}")
        click.echo(f"private cluster running: {cluster.data_dir}")
        shown = dsn
    else:
        shown = settings.database_url_masked or ""
        click.echo("using DATABASE_URL")
        asyncio.run(check_reachable(dsn))  # one bounded attempt, one message
    applied = migrate_sync(dsn)
    if applied:
        click.echo(f"applied {len(applied)} migration(s): {', '.join(applied)}")
    else:
        click.echo("migrations: up to date")
    click.echo(f"DATABASE_URL={shown}")


@db.command("status")
@friendly_errors
def db_status() -> None:
    """Show the private cluster (or DATABASE_URL) and applied / pending migrations."""
    settings = get_settings()
    dsn = settings.database_dsn
    if dsn is None:
        st = EmbeddedPostgres(settings=settings).status()
        state = (
            f"running (pid {st.pid})"
            if st.running
            else ("stopped" if st.initialized else "not initialised")
        )
        if st.problem is not None:
            state += ", unreachable"
        click.echo(f"private cluster: {state}")
        click.echo(f"  data dir: {st.data_dir}")
        click.echo(f"  dsn:      {st.dsn}")
        click.echo(f"  server:   PostgreSQL {st.version or 'not found'} ({st.bin_dir or '-'})")
        if st.problem is not None:
            raise click.ClickException(
                f"the server runs but takes no new connection: {st.problem}. "
                "`enrich db up` restarts it (closing the connections it still has)"
            )
        if not st.running:
            return
        dsn = st.dsn
    else:
        click.echo(f"DATABASE_URL: {settings.database_url_masked}")
        asyncio.run(check_reachable(dsn))  # one bounded attempt, one message
    report = asyncio.run(migration_status(dsn))
    click.echo(f"migrations applied: {len(report.applied)}")
    for mig in report.pending:
        click.echo(f"  pending: {mig.version} {mig.name}")
    if not report.pending:
        click.echo("  none pending")
    for version in report.unknown:
        click.echo(f"  applied but not in this checkout: {version}")


@db.command("down")
@click.option(
    "--force",
    is_flag=True,
    help="Stop it even while enrich commands or other clients are connected: they lose their "
    "connections (a run stops; `enrich run --batch ID` resumes it).",
)
@friendly_errors
def db_down(force: bool) -> None:
    """Stop the private cluster, unless something is connected to it (see --force)."""
    settings = get_settings()
    if settings.database_dsn is not None:
        click.echo("DATABASE_URL is set: there is no private cluster to stop")
        return
    cluster = EmbeddedPostgres(settings=settings)
    if not force:
        _refuse_if_in_use(cluster)
    by = f"`enrich db down{' --force' if force else ''}` (pid {os.getpid()})"
    if cluster.stop(by=by):
        click.echo(f"private cluster stopped: {cluster.data_dir}")
    else:
        click.echo("private cluster was not running")


def _refuse_if_in_use(cluster: EmbeddedPostgres) -> None:
    """Refuse (exit 1, one message) while clients are connected to the running cluster."""
    if not cluster.status().reachable:
        return  # stopped, or no new connection can reach it: nobody to ask, nobody to cut off
    try:
        clients = connected_clients(cluster.dsn_for("postgres"))
    except psycopg.OperationalError as exc:
        raise click.ClickException(
            f"cannot tell who uses the private PostgreSQL at {cluster.home} ({exc}); "
            "`enrich db down --force` stops it anyway"
        ) from exc
    if clients:
        raise click.ClickException(
            in_use_message(f"the private PostgreSQL at {cluster.home}", clients)
        )


register_batch_commands(main)
register_dev_commands(main)
register_ops_commands(main)
register_run_commands(main)


if __name__ == "__main__":
    main()
