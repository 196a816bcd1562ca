"""Callback tokens and the callback receiver of ASYNC steps (issue 7, items 2 and 3)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import psycopg
import pytest
from pydantic import SecretStr

from shared.callbacks.receiver import create_callback_app, serve_callbacks
from shared.callbacks.token import (
    CallbackKeys,
    ExpiredToken,
    InvalidToken,
    load_keys,
    sign,
    verify,
)
from shared.errors import ConfigurationError
from shared.pg_state import PgStateAPI
from shared.settings import Settings
from shared.state_api import StepFailure, StepResult, StepSubmission, TaskOutcome, TaskRef
from tests.contract import claim_and_start, company, state

Conn = psycopg.AsyncConnection[tuple[object, ...]]
KEY = b"k" * 32
OLD_KEY = b"o" * 32
LATER = datetime.now(timezone.utc) + timedelta(hours=1)


def a_task() -> TaskRef:
    return TaskRef(uuid4(), uuid4(), "later", 2)


# Tokens ----------------------------------------------------------------------------------------


def test_a_token_names_its_attempt_and_nothing_else_verifies() -> None:
    keys = CallbackKeys(KEY)
    task = a_task()
    token = sign(task, keys, expires_at=LATER)
    assert verify(token, keys) == task
    version, payload, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    for bad in [
        "",
        "v1",
        "v1.a.b.c",
        f"v2.{payload}.{signature}",
        f"{version}.{payload}.{flipped}",
        f"{version}.{payload[:-1]}.{signature}",
        f"{version}.!!.{signature}",
        sign(task, CallbackKeys(b"x" * 32), expires_at=LATER),
    ]:
        with pytest.raises(InvalidToken):
            verify(bad, keys)


def test_rotation_expiry_and_keys() -> None:
    task = a_task()
    old = sign(task, CallbackKeys(OLD_KEY), expires_at=LATER)
    assert verify(old, CallbackKeys(KEY, previous=OLD_KEY)) == task
    with pytest.raises(InvalidToken):
        verify(old, CallbackKeys(KEY))
    expired = sign(task, CallbackKeys(KEY), expires_at=datetime.now(timezone.utc) - timedelta(1))
    with pytest.raises(ExpiredToken):
        verify(expired, CallbackKeys(KEY))
    assert "k" * 8 not in repr(CallbackKeys(KEY))


def test_keys_come_from_settings_or_a_private_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="at least 32 bytes"):
        load_keys(Settings(enrich_home=tmp_path, callback_secret=SecretStr("short")))
    configured = load_keys(Settings(enrich_home=tmp_path, callback_secret=SecretStr("s" * 32)))
    assert configured.current == b"s" * 32
    made = load_keys(Settings(enrich_home=tmp_path))
    assert load_keys(Settings(enrich_home=tmp_path)) == made
    assert os.stat(tmp_path / "callback.key").st_mode & 0o777 == 0o600


# The receiver ----------------------------------------------------------------------------------


class Counting:
    """Counts the State API's complete() calls."""

    def __init__(self, inner: PgStateAPI) -> None:
        self.inner = inner
        self.completes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def complete(self, results: Sequence[StepResult]) -> list[TaskOutcome]:
        self.completes += 1
        return await self.inner.complete(results)


async def awaiting_rows(api: PgStateAPI, conn: Conn, n: int) -> list[TaskRef]:
    batch_id = await api.create_batch(["step_async"], [company(i) for i in range(n)])
    tasks = await claim_and_start(api, batch_id)
    await api.submit([StepSubmission(t, "req") for t in tasks])
    return tasks


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def post(c: httpx.AsyncClient, token: str, body: Any, **kw: Any) -> httpx.Response:
    return await c.post(f"/callbacks/{token}", json=body, **kw)


async def test_the_status_matrix(api: PgStateAPI, conn: Conn) -> None:
    keys = CallbackKeys(KEY)
    await conn.execute(
        "update enrichment_registry set config = config || '{\"backoff_seconds\": 0}'"
        " where step_name = 'step_async'"
    )
    done, failed, forged, stale = await awaiting_rows(api, conn, 4)
    await api.fail([StepFailure(stale, "provider busy")])  # retried: attempt 2 runs now
    [newer] = [t for t in await claim_and_start(api, stale.batch_id) if t.item_id == stale.item_id]
    assert newer.attempt == 2
    app = create_callback_app(api, keys)
    token = sign(done, keys, expires_at=LATER)
    async with client(app) as c:
        first = await post(c, token, {"request_id": "req", "email": "a@b.example"})
        assert (first.status_code, first.json()) == (200, {"status": "applied"})
        written = await (await conn.execute("select updated_at from step_async_results")).fetchall()
        replay = await post(c, token, {"request_id": "req", "email": "other@b.example"})
        assert (replay.status_code, replay.json()["status"]) == (200, "already applied")
        again = await (await conn.execute("select updated_at from step_async_results")).fetchall()
        assert again == written  # never a second result write

        late = await post(c, sign(stale, keys, expires_at=LATER), {})  # attempt 1's answer
        assert (late.status_code, late.json()["status"]) == (409, "stale attempt")
        assert (await post(c, "v1.bogus.bogus", {})).status_code == 401
        foreign = sign(forged, CallbackKeys(b"z" * 32), expires_at=LATER)
        assert (await post(c, foreign, {})).status_code == 401
        past = datetime.now(timezone.utc) - timedelta(seconds=1)
        assert (await post(c, sign(forged, keys, expires_at=past), {})).status_code == 410
        big = {"blob": "x" * 1_000_001}
        assert (await post(c, sign(forged, keys, expires_at=LATER), big)).status_code == 413
        plain = await c.post(f"/callbacks/{sign(forged, keys, expires_at=LATER)}", content=b"hi")
        assert plain.status_code == 415
        bad_json = await c.post(
            f"/callbacks/{sign(forged, keys, expires_at=LATER)}",
            content=b"{nope",
            headers={"content-type": "application/json"},
        )
        assert bad_json.status_code == 415
        assert (await post(c, sign(forged, keys, expires_at=LATER), [1, 2])).status_code == 422
        assert (await state(conn, forged))["status"] == "IN_PROGRESS"  # nothing changed

        error = {"error": "no such company", "retryable": False}
        assert (await post(c, sign(failed, keys, expires_at=LATER), error)).status_code == 200
    assert (await state(conn, done))["status"] == "COMPLETED"
    assert (await state(conn, failed))["status"] == "FAILED"


async def test_a_burst_of_callbacks_is_applied_in_bulk(api: PgStateAPI, conn: Conn) -> None:
    keys = CallbackKeys(KEY)
    tasks = await awaiting_rows(api, conn, 200)
    counting = Counting(api)
    app = create_callback_app(counting, keys)  # type: ignore[arg-type]
    async with client(app) as c:
        answers = await asyncio.gather(
            *(post(c, sign(t, keys, expires_at=LATER), {"n": i}) for i, t in enumerate(tasks))
        )
    assert {a.status_code for a in answers} == {200}
    rows = await (
        await conn.execute("select count(*) from workflow_states where status = 'COMPLETED'")
    ).fetchone()
    assert rows == (200,)
    assert counting.completes <= 10, counting.completes


async def test_over_real_http(api: PgStateAPI, conn: Conn) -> None:
    keys = CallbackKeys(KEY, previous=OLD_KEY)
    [task] = await awaiting_rows(api, conn, 1)
    server = await serve_callbacks(create_callback_app(api, keys), port=0)
    try:
        async with httpx.AsyncClient() as c:
            token = sign(task, CallbackKeys(OLD_KEY), expires_at=LATER)  # before a rotation
            answer = await c.post(
                f"http://127.0.0.1:{server.port}/callbacks/{token}",
                content=json.dumps({"ok": True}),
                headers={"content-type": "application/json"},
            )
    finally:
        await server.stop()
    assert answer.status_code == 200
    assert (await state(conn, task))["status"] == "COMPLETED"
