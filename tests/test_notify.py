"""Wake-ups: one ``pg_notify`` on ``enrichment_state_changed`` per statement, never one per row.

A second connection LISTENs. To know that nothing more will arrive without sleeping, each test
sends a sentinel notification after the action: notifications are delivered in commit order, so
everything the action sent arrives before the sentinel.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from shared.pg_state import PgStateAPI
from shared.state_api import StepFailure, StepResult

from .contract import Conn, company

CHANNEL = "enrichment_state_changed"
SENTINEL = "sentinel"
DEADLINE_SECONDS = 10.0


class Listener:
    def __init__(self, listen: Conn, send: Conn) -> None:
        self._listen = listen
        self._send = send

    async def collect(self) -> list[dict[str, Any]]:
        """Every notification sent since the last call, up to a sentinel sent now."""
        token = f"{SENTINEL}-{uuid.uuid4()}"
        await self._send.execute("select pg_notify(%s, %s)", (CHANNEL, token))
        payloads: list[dict[str, Any]] = []
        deadline = time.monotonic() + DEADLINE_SECONDS
        while (remaining := deadline - time.monotonic()) > 0:
            async for note in self._listen.notifies(timeout=remaining, stop_after=1):
                if note.payload == token:
                    return payloads
                assert note.channel == CHANNEL
                payloads.append(json.loads(note.payload))
        pytest.fail(f"no sentinel notification within {DEADLINE_SECONDS}s; got {payloads}")


@pytest.fixture
async def listener(dsn: str, conn: Conn) -> AsyncIterator[Listener]:
    listen = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
    try:
        await listen.execute(f"listen {CHANNEL}")
        yield Listener(listen, conn)
    finally:
        await listen.close()


@pytest.fixture
async def api(dsn: str) -> AsyncIterator[PgStateAPI]:
    async with await PgStateAPI.open(dsn, max_size=1) as state_api:
        yield state_api


async def test_creating_a_batch_notifies_once(api: PgStateAPI, listener: Listener) -> None:
    batch_id = await api.create_batch(["step_a"], [company(i) for i in range(50)])

    [note] = await listener.collect()

    assert note["batch_ids"] == [str(batch_id)]
    assert (note["op"], note["ready"], note["finished"]) == ("INSERT", 50, 0)
    assert note["more_batches"] is False


async def test_claim_start_and_heartbeat_do_not_notify(api: PgStateAPI, listener: Listener) -> None:
    batch_id = await api.create_batch(["step_a"], [company(i) for i in range(20)])
    await listener.collect()

    claimed = [c.task for c in await api.claim(100)]
    await api.start(claimed)
    await api.heartbeat(claimed)
    await api.mark_dispatched([(t, "call") for t in claimed])

    assert len(claimed) == 20 and {t.batch_id for t in claimed} == {batch_id}
    assert await listener.collect() == []


async def test_completing_many_rows_notifies_once_per_statement(
    api: PgStateAPI, listener: Listener
) -> None:
    batch_id = await api.create_batch(["step_a", "step_b"], [company(i) for i in range(30)])
    started = [c.task for c in await api.claim(100)]
    await api.start(started)
    await listener.collect()

    await api.complete([StepResult(t, {}) for t in started])

    # Two statements changed rows: the 30 completions and the 30 next steps seeded.
    notes = await listener.collect()
    assert sorted((n["op"], n["ready"], n["finished"]) for n in notes) == [
        ("INSERT", 30, 0),
        ("UPDATE", 0, 30),
    ]
    assert all(n["batch_ids"] == [str(batch_id)] for n in notes)

    last = [c.task for c in await api.claim(100)]
    await api.start(last)
    await listener.collect()
    await api.complete([StepResult(t, {}) for t in last])

    [note] = await listener.collect()  # the last step seeds nothing
    assert (note["op"], note["ready"], note["finished"]) == ("UPDATE", 0, 30)


async def test_failing_retrying_and_cancelling_notify_once_each(
    conn: Conn, api: PgStateAPI, listener: Listener
) -> None:
    batch_id = await api.create_batch(["step_a"], [company(i) for i in range(10)])
    started = [c.task for c in await api.claim(100)]
    await api.start(started)
    await listener.collect()

    await api.fail([StepFailure(t, "503") for t in started])
    [retry] = await listener.collect()
    assert (retry["ready"], retry["finished"], retry["batch_ids"]) == (10, 0, [str(batch_id)])

    await api.cancel_batch(batch_id)
    [cancel] = await listener.collect()
    assert (cancel["ready"], cancel["finished"]) == (0, 10)

    await api.retry_failed(batch_id)
    [resumed] = await listener.collect()
    assert (resumed["ready"], resumed["finished"]) == (10, 0)


async def test_sweeping_expired_leases_notifies_once(
    conn: Conn, api: PgStateAPI, listener: Listener
) -> None:
    batch_id = await api.create_batch(["step_a"], [company(i) for i in range(10)])
    await api.claim(100)
    await listener.collect()
    await conn.execute(
        "update workflow_states set lease_expires_at = now() - interval '1 second'"
        " where batch_id = %s",
        (batch_id,),
    )
    assert await listener.collect() == []  # the lease update leaves rows QUEUED

    assert len(await api.sweep_expired_leases()) == 10

    [note] = await listener.collect()
    assert (note["ready"], note["finished"], note["batch_ids"]) == (10, 0, [str(batch_id)])


async def test_one_statement_over_many_batches_names_each_batch(
    conn: Conn, listener: Listener
) -> None:
    batch_ids: list[uuid.UUID] = []
    for _ in range(101):
        cur = await conn.execute(
            "insert into batches (blueprint) values ('[\"step_a\"]') returning id"
        )
        row = await cur.fetchone()
        assert row is not None
        batch_ids.append(row[0])
    assert await listener.collect() == []  # batches alone start nothing

    await conn.execute(
        "insert into batch_items (batch_id, raw_data) select b, '{}' from unnest(%s::uuid[]) b",
        (batch_ids[:3],),
    )
    [few] = await listener.collect()
    assert sorted(few["batch_ids"]) == sorted(str(b) for b in batch_ids[:3])
    assert (few["ready"], few["more_batches"]) == (3, False)

    await conn.execute(
        "insert into batch_items (batch_id, raw_data) select b, '{}' from unnest(%s::uuid[]) b",
        (batch_ids,),
    )
    [many] = await listener.collect()
    # The payload stays small: at most 100 batch ids, and a flag that there are more.
    assert len(many["batch_ids"]) == 100
    assert set(many["batch_ids"]) < {str(b) for b in batch_ids}
    assert (many["ready"], many["more_batches"]) == (101, True)
