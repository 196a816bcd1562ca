"""Loads the named runtime queries of ``shared/sql/queries.sql``."""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


@cache
def load_queries() -> dict[str, str]:
    text = resources.files("shared").joinpath("sql/queries.sql").read_text(encoding="utf-8")
    parts = _HEADER.split(text)
    # parts = [preamble, name1, body1, name2, body2, ...]
    queries = {
        name: body.strip().rstrip(";") for name, body in zip(parts[1::2], parts[2::2], strict=True)
    }
    return queries


def query(name: str) -> str:
    try:
        return load_queries()[name]
    except KeyError:
        raise KeyError(f"no query named {name!r} in shared/sql/queries.sql") from None
