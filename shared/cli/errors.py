"""How the ``enrich`` commands show the project's errors."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import ParamSpec, TypeVar

import click

from shared.errors import EnrichError

P = ParamSpec("P")
R = TypeVar("R")


def friendly_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Show the project's errors as one clean message and exit 1, without a traceback."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except EnrichError as exc:
            raise click.ClickException(f"{type(exc).__name__}: {exc}") from exc

    return wrapper
