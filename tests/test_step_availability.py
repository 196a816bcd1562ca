"""A registry step marked ``config.unavailable`` refuses new batches, with its reason (what
deploy.sh sets on clay_enrich when no Clay webhook URL was deployed)."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from shared.errors import EnrichError
from shared.pg_state import PgStateAPI
from tests.contract import company

Conn = psycopg.AsyncConnection[Any]
REASON = "CLAY_WEBHOOK_URL was not deployed to the workers: set it and run ./deploy.sh --apply"


async def mark(conn: Conn, step: str, reason: object) -> None:
    await conn.execute(
        "update enrichment_registry"
        " set config = config || jsonb_build_object('unavailable', %s::jsonb)"
        " where step_name = %s",
        (psycopg.types.json.Jsonb(reason), step),
    )


async def test_a_batch_naming_an_unavailable_step_is_refused_with_the_reason(
    conn: Conn, api: PgStateAPI
) -> None:
    await mark(conn, "step_b", REASON)
    with pytest.raises(psycopg.errors.InvalidParameterValue, match=r"step_b.*unavailable.*deploy"):
        await conn.execute('insert into batches (blueprint) values (\'["step_a", "step_b"]\')')
    await conn.rollback()
    with pytest.raises(EnrichError, match=r'step "step_b" is unavailable: CLAY_WEBHOOK_URL'):
        await api.create_batch(["step_a", "step_b"], [company(1)])
    cur = await conn.execute("select count(*) from batches")
    assert await cur.fetchone() == (0,)
    # Other steps are not affected, and clearing the mark makes the step usable again.
    assert await api.create_batch(["step_a"], [company(1)])
    await conn.execute(
        "update enrichment_registry set config = config - 'unavailable' where step_name = 'step_b'"
    )
    assert await api.create_batch(["step_a", "step_b"], [company(1)])


async def test_the_reason_must_be_a_string(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="must be a reason"):
        await mark(conn, "step_b", True)
