"""``enrich retry`` and ``enrich cancel``: operating a batch. ``enrich export`` lives in
``shared.cli.export_command`` (with ``export_*`` beside it) and is registered here with them.

Output conventions as ``batch_commands``: data on stdout, messages on stderr; exit 0 success, 1 an
unknown batch or a database problem, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

from uuid import UUID

import click
from rich.text import Text

from shared.cli.batch_commands import _run, _stderr
from shared.cli.export_command import export
from shared.cli.text import visible
from shared.db.connect import resolve_dsn
from shared.pg_state import PgStateAPI


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


__all__ = ["cancel", "export", "register_ops_commands", "retry"]
