"""The ``state_api`` fixture: every StateAPI implementation, each over this test's fresh database.

Every test in ``tests/contract`` runs once per implementation. The raw-SQL fixture ``conn`` (from
``tests/conftest.py``) reaches the same database, for set-up and inspection only.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from shared.pg_state import PgStateAPI
from shared.state_api import StateAPI

IMPLEMENTATIONS = ["postgres"]


@pytest.fixture(params=IMPLEMENTATIONS)
async def state_api(request: pytest.FixtureRequest, dsn: str) -> AsyncIterator[StateAPI]:
    if request.param == "postgres":
        api = await PgStateAPI.open(dsn, min_size=1, max_size=4)
        try:
            yield api
        finally:
            await api.close()
    else:  # pragma: no cover - a new implementation must be wired here
        raise ValueError(f"no StateAPI implementation named {request.param!r}")
