"""The callback receiver (issue 7, item 3) against the real test database: every answer of the
status matrix, what it did (or did not do) to the row, bulk application of a burst, and a real
HTTP round trip through ``serve_callbacks``.

Rows are ``step_async`` rows (the built-in ASYNC shell, results in ``step_async_results``) that a
worker has claimed, started and submitted: IN_PROGRESS, awaiting their callback.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any
from uuid import uuid4

import httpx
import psycopg
import pytest

from shared.callbacks.receiver import (
    create_callback_app,
    default_parser,
    serve_callbacks,
)
from shared.callbacks.token import CallbackKeys, sign
from shared.errors import DatabaseUnavailable
from shared.pg_state import PgStateAPI
from shared.state_api import (
    FailOutcome,
    StepFailure,
    StepResult,
    StepSubmission,
    TaskOutcome,
    TaskRef,
)
from tests.contract import claim_and_start, company, configure_step, fetch, state

Conn = psycopg.AsyncConnection[Any]
KEY = b"k" * 32
OLD_KEY = b"o" * 32
KEYS = CallbackKeys(KEY)


def later() -> datetime:
    return datetime.now(timezone.utc) + timedelta(hours=1)


def token_for(task: TaskRef, keys: CallbackKeys = KEYS) -> str:
    return sign(task, keys, expires_at=later())


class Counting:
    """The State API, counting the bulk calls the receiver makes (and able to fail them)."""

    def __init__(self, inner: PgStateAPI) -> None:
        self.inner = inner
        self.completes: list[int] = []  # the size of each complete() call
        self.fails: list[int] = []
        self.unavailable = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def complete(self, results: Sequence[StepResult]) -> list[TaskOutcome]:
        self.completes.append(len(results))
        if self.unavailable:
            raise DatabaseUnavailable("the database could not be reached")
        return await self.inner.complete(results)

    async def fail(self, failures: Sequence[StepFailure]) -> list[FailOutcome]:
        self.fails.append(len(failures))
        return await self.inner.fail(failures)


@pytest.fixture
def counting(api: PgStateAPI) -> Counting:
    return Counting(api)


@pytest.fixture
async def client(counting: Counting) -> AsyncIterator[httpx.AsyncClient]:
    app = create_callback_app(counting, KEYS)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://receiver") as c:
        yield c


async def awaiting(api: PgStateAPI, n: int) -> list[TaskRef]:
    """``n`` step_async rows, submitted to their provider and awaiting a callback."""
    batch_id = await api.create_batch(["step_async"], [company(i) for i in range(n)])
    tasks = await claim_and_start(api, batch_id)
    submitted = await api.submit([StepSubmission(t, f"req-{t.item_id}") for t in tasks])
    assert all(s.ok for s in submitted), submitted
    return tasks


async def results_rows(conn: Conn, task: TaskRef) -> list[dict[str, Any]]:
    return await fetch(
        conn,
        "select attempt, result, created_at, updated_at from step_async_results"
        " where batch_id = %s and item_id = %s",
        (task.batch_id, task.item_id),
    )


async def snapshot(conn: Conn, task: TaskRef) -> tuple[Any, ...]:
    """What a refused callback must leave alone: the row and its results."""
    row = await state(conn, task)
    return (row["status"], row["attempt"], row["meta"], row["updated_at"]), await results_rows(
        conn, task
    )


async def post(c: httpx.AsyncClient, token: str, body: Any = None, **kwargs: Any) -> httpx.Response:
    if body is not None:
        kwargs["json"] = body
    return await c.post(f"/callbacks/{token}", **kwargs)


def answer(response: httpx.Response) -> tuple[int, str]:
    assert response.headers["content-type"] == "application/json", response.text
    return response.status_code, response.json()["status"]


# 200: applied, and applied only once ----------------------------------------------------------


async def test_a_valid_callback_completes_the_row(
    api: PgStateAPI, conn: Conn, client: httpx.AsyncClient
) -> None:
    [task] = await awaiting(api, 1)
    body = {"request_id": "req-1", "email": "ceo@company0.example"}
    assert answer(await post(client, token_for(task), body)) == (200, "applied")
    row = await state(conn, task)
    assert (row["status"], row["attempt"]) == ("COMPLETED", 1)
    [written] = await results_rows(conn, task)
    assert (written["attempt"], written["result"]) == (1, body)


async def test_a_replay_changes_nothing(
    api: PgStateAPI, conn: Conn, client: httpx.AsyncClient, counting: Counting
) -> None:
    [task] = await awaiting(api, 1)
    token = token_for(task)
    assert answer(await post(client, token, {"email": "first@x.example"})) == (200, "applied")
    before = await snapshot(conn, task)
    for body in ({"email": "first@x.example"}, {"email": "second@x.example"}, {"error": "late"}):
        assert answer(await post(client, token, body)) == (200, "already applied")
    assert await snapshot(conn, task) == before  # never a second result write
    assert before[1][0]["result"] == {"email": "first@x.example"}


async def test_duplicate_callbacks_in_one_burst_apply_once(
    api: PgStateAPI, conn: Conn, client: httpx.AsyncClient, counting: Counting
) -> None:
    [task] = await awaiting(api, 1)
    token = token_for(task)
    answers = await asyncio.gather(*(post(client, token, {"n": i}) for i in range(5)))
    assert sorted(answer(a)[1] for a in answers) == ["already applied"] * 4 + ["applied"]
    assert counting.completes == [1]  # one row, once, in one statement
    assert len(await results_rows(conn, task)) == 1
    assert (await state(conn, task))["status"] == "COMPLETED"


# Failures reported by the provider ------------------------------------------------------------


async def test_a_failure_body_fails_the_attempt(
    api: PgStateAPI, conn: Conn, client: httpx.AsyncClient
) -> None:
    retry, give_up, odd = await awaiting(api, 3)
    assert answer(await post(client, token_for(retry), {"error": "rate limited"})) == (
        200,
        "applied",
    )
    no_such = {"error": "no such company", "retryable": False}
    assert answer(await post(client, token_for(give_up), no_such)) == (200, "applied")
    # Not a boolean: the default (retryable) holds.
    assert answer(await post(client, token_for(odd), {"error": "x", "retryable": "no"}))[0] == 200
    assert (await state(conn, retry))["status"] == "PENDING"  # retried with backoff
    assert (await state(conn, odd))["status"] == "PENDING"
    failed = await state(conn, give_up)
    assert failed["status"] == "FAILED"
    assert "no such company" in json.dumps(failed["meta"])
    for task in (retry, give_up):
        assert await results_rows(conn, task) == []


def test_the_default_parser() -> None:
    task = TaskRef(uuid4(), uuid4(), "step_async", 1)
    assert default_parser(task, {"error": "e"}) == StepFailure(task, "e", retryable=True)
    assert default_parser(task, {"error": "e", "retryable": False}) == StepFailure(
        task, "e", retryable=False
    )
    # An "error" that is not a string is part of a result, not a failure.
    assert default_parser(task, {"error": None, "a": 1}) == StepResult(
        task, {"error": None, "a": 1}
    )
    assert default_parser(task, {}) == StepResult(task, {})


async def test_a_step_parser_reads_its_provider_s_body(
    api: PgStateAPI, conn: Conn, counting: Counting
) -> None:
    first, second = await awaiting(api, 2)

    def clay_like(task: TaskRef, body: Mapping[str, Any]) -> StepResult | StepFailure:
        if body["status"] == "error":  # a KeyError for a body without a status: 422
            return StepFailure(task, str(body["message"]), retryable=False)
        return StepResult(task, {"email": body["data"]["email"]})

    app = create_callback_app(counting, KEYS, parsers={"step_async": clay_like})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
        assert answer(await post(c, token_for(first), {"nope": 1})) == (
            422,
            "a body step_async cannot read",
        )
        assert (await state(conn, first))["status"] == "IN_PROGRESS"
        ok = {"status": "ok", "data": {"email": "a@b.example", "noise": "x"}}
        assert answer(await post(c, token_for(first), ok)) == (200, "applied")
        bad = {"status": "error", "message": "row deleted in Clay"}
        assert answer(await post(c, token_for(second), bad)) == (200, "applied")
    assert (await results_rows(conn, first))[0]["result"] == {"email": "a@b.example"}
    assert (await state(conn, second))["status"] == "FAILED"


# Refusals: nothing changes ----------------------------------------------------------------------


async def test_a_callback_for_an_older_attempt_is_409(
    api: PgStateAPI, conn: Conn, client: httpx.AsyncClient
) -> None:
    await configure_step(conn, "step_async", backoff_seconds=0)
    [first] = await awaiting(api, 1)
    old_token = token_for(first)
    await api.fail([StepFailure(first, "no callback in time")])  # retried: attempt 2 now
    [second] = await claim_and_start(api, first.batch_id)
    assert (second.item_id, second.attempt) == (first.item_id, 2)
    before = await snapshot(conn, second)
    assert answer(await post(client, old_token, {"email": "late@x.example"})) == (
        409,
        "stale attempt",
    )
    assert await snapshot(conn, second) == before
    assert answer(await post(client, token_for(second), {"email": "new@x.example"})) == (
        200,
        "applied",
    )
    assert (await results_rows(conn, second))[0]["attempt"] == 2


async def test_a_row_that_is_gone_is_410(
    api: PgStateAPI, conn: Conn, client: httpx.AsyncClient
) -> None:
    [task] = await awaiting(api, 1)
    nowhere = TaskRef(uuid4(), uuid4(), "step_async", 1)
    assert answer(await post(client, token_for(nowhere), {"a": 1})) == (410, "gone")
    await conn.execute("delete from batches where id = %s", (task.batch_id,))
    assert answer(await post(client, token_for(task), {"a": 1})) == (410, "gone")


async def test_bad_tokens_are_401_and_expired_ones_410(
    api: PgStateAPI, conn: Conn, client: httpx.AsyncClient, counting: Counting
) -> None:
    [task] = await awaiting(api, 1)
    before = await snapshot(conn, task)
    good = token_for(task)
    version, payload, signature = good.split(".")
    other_task = TaskRef(task.batch_id, task.item_id, task.step_name, 9)
    other_payload = token_for(other_task).split(".")[1]
    for bad in [
        sign(task, CallbackKeys(b"z" * 32), expires_at=later()),  # forged: a key we do not hold
        f"{version}.{other_payload}.{signature}",  # tampered payload
        f"{version}.{payload}.{signature[:-3]}AAA",  # tampered signature
        f"{version}.{payload}",  # malformed
        f"v2.{payload}.{signature}",
        "v1.!!.AAAA",
        "not-a-token",
        "v1." + "A" * 3000 + ".AAAA",
    ]:
        response = await post(client, bad, {"email": "evil@x.example"})
        assert answer(response) == (401, "invalid token"), bad
        assert payload not in response.text
    expired = sign(task, KEYS, expires_at=datetime.now(timezone.utc) - timedelta(seconds=1))
    assert answer(await post(client, expired, {"email": "late@x.example"})) == (
        410,
        "expired token",
    )
    assert await snapshot(conn, task) == before
    assert counting.completes == [] and counting.fails == []  # the database never asked


async def test_bodies_too_large_not_json_or_not_an_object(
    api: PgStateAPI, conn: Conn, client: httpx.AsyncClient, counting: Counting
) -> None:
    [task] = await awaiting(api, 1)
    token = token_for(task)
    before = await snapshot(conn, task)
    json_type = {"content-type": "application/json"}

    def exactly(size: int) -> bytes:
        """A JSON object of exactly ``size`` bytes."""
        body = json.dumps({"pad": ""}).encode()
        return json.dumps({"pad": "x" * (size - len(body))}).encode()

    too_big = exactly(1_000_001)
    assert len(too_big) == 1_000_001
    assert answer(await post(client, token, content=too_big, headers=json_type))[0] == 413

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(20):
            yield b" " * 100_000

    assert answer(await post(client, token, content=chunked(), headers=json_type))[0] == 413

    for content, headers in [
        (b'{"a": 1}', {"content-type": "text/plain"}),
        (b'{"a": 1}', {}),
        (b'{"a": 1}', {"content-type": "application/jsonx"}),
        (b"{nope", json_type),
        (b"", json_type),
        (b"\xff\xfe{}", json_type),
    ]:
        response = await post(client, token, content=content, headers=headers)
        assert answer(response)[0] == 415, (content, headers)
    for content in (b"[1, 2]", b'"text"', b"null", b"[" * 100_000):
        response = await post(client, token, content=content, headers=json_type)
        assert answer(response)[0] == 422, content[:10]
    assert await snapshot(conn, task) == before
    assert counting.completes == []

    # Exactly the limit is fine, and so is a JSON-based media type with parameters.
    headers = {"content-type": "application/vnd.provider+json; charset=utf-8"}
    assert answer(await post(client, token, content=exactly(1_000_000), headers=headers)) == (
        200,
        "applied",
    )


async def test_other_routes_and_methods_answer_json(client: httpx.AsyncClient) -> None:
    assert answer(await client.get("/callbacks/abc")) == (405, "method not allowed")
    assert answer(await client.post("/elsewhere", json={})) == (404, "not found")


async def test_an_unreachable_database_is_503_with_retry_after(
    api: PgStateAPI, conn: Conn, client: httpx.AsyncClient, counting: Counting
) -> None:
    [task] = await awaiting(api, 1)
    counting.unavailable = True
    response = await post(client, token_for(task), {"email": "a@b.example"})
    assert answer(response) == (503, "database unavailable")
    assert int(response.headers["retry-after"]) > 0
    assert (await state(conn, task))["status"] == "IN_PROGRESS"
    counting.unavailable = False  # the provider retries, and it lands
    assert answer(await post(client, token_for(task), {"email": "a@b.example"})) == (
        200,
        "applied",
    )


# Bursts ----------------------------------------------------------------------------------------


async def test_a_burst_of_200_callbacks_is_applied_in_bulk(
    api: PgStateAPI, conn: Conn, client: httpx.AsyncClient, counting: Counting
) -> None:
    tasks = await awaiting(api, 200)
    failing = set(tasks[:20])
    await configure_step(conn, "step_async", backoff_seconds=0)

    async def callback(i: int, task: TaskRef) -> httpx.Response:
        body = {"error": "busy"} if task in failing else {"n": i}
        return await post(client, token_for(task), body)

    answers = await asyncio.gather(*(callback(i, t) for i, t in enumerate(tasks)))
    assert {answer(a) for a in answers} == {(200, "applied")}
    rows = await fetch(
        conn,
        "select status::text as status, count(*) as n from workflow_states"
        " where batch_id = %s group by 1",
        (tasks[0].batch_id,),
    )
    assert {r["status"]: r["n"] for r in rows} == {"COMPLETED": 180, "PENDING": 20}
    assert sum(counting.completes) == 180 and sum(counting.fails) == 20
    # A handful of statements, not 200 transactions.
    assert len(counting.completes) <= 10, counting.completes
    assert len(counting.fails) <= 10, counting.fails


async def test_a_burst_larger_than_batch_max_is_split(
    api: PgStateAPI, conn: Conn, counting: Counting
) -> None:
    tasks = await awaiting(api, 120)
    app = create_callback_app(counting, KEYS, batch_max=50, batch_window_seconds=1.0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://r") as c:
        answers = await asyncio.gather(*(post(c, token_for(t), {"ok": True}) for t in tasks))
    assert {a.status_code for a in answers} == {200}
    assert max(counting.completes) <= 50 and sum(counting.completes) == 120


# Over real HTTP -----------------------------------------------------------------------------------


async def test_over_real_http_with_a_rotated_key(api: PgStateAPI, conn: Conn) -> None:
    old, new = await awaiting(api, 2)
    old_token = sign(old, CallbackKeys(OLD_KEY), expires_at=later())  # out before the rotation
    rotated = CallbackKeys(KEY, previous=OLD_KEY)
    server = await serve_callbacks(create_callback_app(api, rotated), port=0)
    try:
        assert server.port != 0 and server.url == f"http://127.0.0.1:{server.port}"
        async with httpx.AsyncClient(base_url=server.url) as c:
            for task, token in ((old, old_token), (new, sign(new, rotated, expires_at=later()))):
                response = await post(c, token, {"email": f"{task.item_id}@x.example"})
                assert answer(response) == (200, "applied")
            replay = await post(c, old_token, {"email": "again@x.example"})
            assert answer(replay) == (200, "already applied")
            forged = sign(new, CallbackKeys(b"z" * 32), expires_at=later())
            assert answer(await post(c, forged, {}))[0] == 401
            big = await c.post(
                f"/callbacks/{old_token}",
                content=b"{" + b" " * 1_000_000 + b"}",
                headers={"content-type": "application/json"},
            )
            assert answer(big)[0] == 413
    finally:
        await server.stop()
    for task in (old, new):
        assert (await state(conn, task))["status"] == "COMPLETED"
    with pytest.raises(httpx.ConnectError):  # stopped: nothing listens any more
        async with httpx.AsyncClient() as c:
            await c.post(f"{server.url}/callbacks/x")


async def test_a_taken_port_is_an_error(api: PgStateAPI) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"could not listen on 127.0.0.1:{port}: "):
            await serve_callbacks(create_callback_app(api, KEYS), port=port)
