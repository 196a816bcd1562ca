"""The ``state_api`` fixture: every StateAPI implementation, each over this test's fresh database.

Every test in ``tests/contract`` runs once per implementation. The raw-SQL fixture ``conn`` (from
``tests/conftest.py``) reaches the same database, for set-up and inspection only.

- ``postgres``: ``PgStateAPI`` on a psycopg pool.
- ``supabase``: ``SupabaseStateAPI`` (supabase-py) against a fake ``https://<ref>.supabase.co``
  whose REST endpoint is ``tests.postgrest_emulator``, running each RPC in the same database as
  the service role, the way PostgREST does.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from pydantic import SecretStr

from shared.pg_state import PgStateAPI
from shared.state_api import StateAPI
from shared.supabase_state import SupabaseStateAPI
from tests.postgrest_emulator import SERVICE_ROLE_KEY, SUPABASE_URL, emulate_supabase

IMPLEMENTATIONS = ["postgres", "supabase"]


@pytest.fixture(params=IMPLEMENTATIONS)
async def state_api(request: pytest.FixtureRequest, dsn: str) -> AsyncIterator[StateAPI]:
    if request.param == "postgres":
        api = await PgStateAPI.open(dsn, min_size=1, max_size=4)
        try:
            yield api
        finally:
            await api.close()
    elif request.param == "supabase":
        async with emulate_supabase(dsn, SUPABASE_URL):
            supabase = await SupabaseStateAPI.open(SUPABASE_URL, SecretStr(SERVICE_ROLE_KEY))
            try:
                yield supabase
            finally:
                await supabase.close()
    else:  # pragma: no cover - a new implementation must be wired here
        raise ValueError(f"no StateAPI implementation named {request.param!r}")
