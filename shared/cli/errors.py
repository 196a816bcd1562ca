"""How the ``enrich`` commands show the project's errors."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import click

from shared.cli.text import visible
from shared.errors import ConfigurationError, EnrichError

P = ParamSpec("P")
R = TypeVar("R")

EXIT_INTERRUPTED = 130
EXIT_BAD_CONFIGURATION = 2


def friendly_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Show the project's errors as one clean message and exit 1 (2 for a bad setting or
    environment), without a traceback; Ctrl-C exits 130 (as the README promises), not click's
    "Aborted!" and 1."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ConfigurationError as exc:
            # A bad setting or environment, as `enrich` reports one before any command: exit 2.
            click.echo(visible(f"error: {type(exc).__name__}: {exc}"), err=True)
            sys.exit(EXIT_BAD_CONFIGURATION)
        except EnrichError as exc:
            raise click.ClickException(visible(f"{type(exc).__name__}: {exc}")) from exc
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)

    return wrapper
