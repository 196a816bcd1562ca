"""``enrich``: the command line. For now only ``enrich db up|status|down``."""

from __future__ import annotations

import asyncio
import sys

import click

from shared.cli.batch_commands import register_batch_commands
from shared.cli.dev_commands import register_dev_commands
from shared.cli.errors import friendly_errors
from shared.cli.ops_commands import register_ops_commands
from shared.cli.run_commands import register_run_commands
from shared.db.embedded import EmbeddedPostgres
from shared.db.migrate import migrate_sync
from shared.db.migrate import status as migration_status
from shared.errors import ConfigurationError
from shared.settings import get_settings


@click.group()
@click.version_option(package_name="enrich-orchestrator")
def main() -> None:
    """Data-enrichment orchestrator: PostgreSQL is the source of truth."""
    # Read the settings once, here: a bad variable is one line and exit 2, before any command
    # does anything, rather than a traceback from whichever command reads them first.
    try:
        get_settings()
    except ConfigurationError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)


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
    report = asyncio.run(migration_status(dsn))
    click.echo(f"migrations applied: {len(report.applied)}")
    for mig in report.pending:
        click.echo(f"  pending: {mig.version} {mig.name}")
    if not report.pending:
        click.echo("  none pending")
    for version in report.unknown:
        click.echo(f"  applied but not in this checkout: {version}")


@db.command("down")
@friendly_errors
def db_down() -> None:
    """Stop the private cluster."""
    settings = get_settings()
    if settings.database_dsn is not None:
        click.echo("DATABASE_URL is set: there is no private cluster to stop")
        return
    cluster = EmbeddedPostgres(settings=settings)
    if cluster.stop():
        click.echo(f"private cluster stopped: {cluster.data_dir}")
    else:
        click.echo("private cluster was not running")


register_batch_commands(main)
register_dev_commands(main)
register_ops_commands(main)
register_run_commands(main)


if __name__ == "__main__":
    main()
