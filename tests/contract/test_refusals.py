"""Calls the State API refuses: wrong status, stale attempt, unknown rows or batches, bad input.

A refused worker call is not an error: it comes back as an ``Outcome`` per row and changes nothing.
Unknown batches raise ``NotFound``; malformed arguments raise ``InvalidInput`` (SQLSTATE 22023).
"""

from __future__ import annotations

import uuid
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from shared.errors import InvalidInput, NotFound
from shared.state_api import Outcome, StateAPI, StepFailure, StepResult, TaskRef

from . import (
    TWO_STEPS,
    Conn,
    claim_all,
    claim_and_start,
    company,
    configure_step,
    expire_leases,
    item_ids,
    outcomes,
    register_step,
    results,
    state,
    states,
    tasks,
    with_attempt,
)

RESULT = {"domain": "company0.example"}


async def test_complete_before_start_is_refused(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(0)])
    [task] = tasks(await claim_all(state_api, batch_id))

    [answer] = await state_api.complete([StepResult(task, RESULT)])

    assert answer.outcome is Outcome.WRONG_STATUS and not answer.ok
    assert (await state(conn, task))["status"] == "QUEUED"
    assert await results(conn, "normalize_domain_results", batch_id) == []
    assert await states(conn, batch_id, "clean_company_name") == []


async def test_second_complete_is_refused_and_changes_nothing(
    state_api: StateAPI, conn: Conn
) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(0)])
    [task] = await claim_and_start(state_api, batch_id)
    [first] = await state_api.complete([StepResult(task, RESULT)])
    assert first.ok

    [second] = await state_api.complete([StepResult(task, {"domain": "other.example"})])

    assert second.outcome is Outcome.WRONG_STATUS
    [stored] = await results(conn, "normalize_domain_results", batch_id)
    assert stored["domain"] == "company0.example"
    assert len(await states(conn, batch_id, "clean_company_name")) == 1


async def test_calls_on_a_pending_row_are_refused(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(0)])
    [row] = await states(conn, batch_id)
    task = TaskRef(batch_id, row["item_id"], row["step_name"], 0)

    assert [s.outcome for s in await state_api.start([task])] == [Outcome.WRONG_STATUS]
    assert [s.raw_data for s in await state_api.start([task])] == [None]
    assert [c.outcome for c in await state_api.complete([StepResult(task, RESULT)])] == [
        Outcome.WRONG_STATUS
    ]
    assert [h.outcome for h in await state_api.heartbeat([task])] == [Outcome.WRONG_STATUS]
    [failed] = await state_api.fail([StepFailure(task, "x")])
    assert (failed.outcome, failed.status) == (Outcome.WRONG_STATUS, "PENDING")
    assert [r.outcome for r in await state_api.release([task], "x")] == [Outcome.WRONG_STATUS]
    after = await state(conn, task)
    assert (after["status"], after["attempt"], after["meta"]) == ("PENDING", 0, {})


async def test_calls_on_a_completed_row_are_refused(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(["step_a"], [company(0)])
    [task] = await claim_and_start(state_api, batch_id)
    await state_api.complete([StepResult(task, {"slept_ms": 5})])

    [started] = await state_api.start([task])
    assert (started.outcome, started.raw_data, started.config) == (Outcome.WRONG_STATUS, None, None)
    [failed] = await state_api.fail([StepFailure(task, "late failure")])
    assert (failed.outcome, failed.status) == (Outcome.WRONG_STATUS, "COMPLETED")
    assert [h.outcome for h in await state_api.heartbeat([task])] == [Outcome.WRONG_STATUS]
    assert [r.outcome for r in await state_api.release([task], "x")] == [Outcome.WRONG_STATUS]
    row = await state(conn, task)
    assert row["status"] == "COMPLETED"
    assert "last_error" not in row["meta"]
    assert (await state_api.batch_progress(batch_id)).status == "COMPLETED"


async def test_heartbeat_before_start_is_refused(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(0)])
    [task] = tasks(await claim_all(state_api, batch_id))
    lease = (await state(conn, task))["lease_expires_at"]

    [beat] = await state_api.heartbeat([task])

    assert beat.outcome is Outcome.WRONG_STATUS
    row = await state(conn, task)
    assert (row["status"], row["lease_expires_at"]) == ("QUEUED", lease)


async def test_old_attempt_is_fenced_off_after_lease_expiry(
    state_api: StateAPI, conn: Conn
) -> None:
    await configure_step(conn, "normalize_domain", backoff_seconds=0)
    batch_id = await state_api.create_batch(TWO_STEPS, [company(0)])
    [old] = await claim_and_start(state_api, batch_id)
    await expire_leases(conn, batch_id)
    [swept] = await state_api.sweep_expired_leases()
    assert (swept.task, swept.status) == (old, "PENDING")
    # The lost worker wakes up while the row waits for its retry: same attempt, wrong status.
    assert [h.outcome for h in await state_api.heartbeat([old])] == [Outcome.WRONG_STATUS]
    assert [c.outcome for c in await state_api.complete([StepResult(old, {"domain": "old"})])] == [
        Outcome.WRONG_STATUS
    ]
    [new] = tasks(await claim_all(state_api, batch_id))
    assert new == with_attempt(old, 2)

    # ...or once the row was claimed again, while the new attempt is still QUEUED...
    assert [s.outcome for s in await state_api.start([old])] == [Outcome.STALE_ATTEMPT]
    assert [c.outcome for c in await state_api.complete([StepResult(old, {"domain": "old"})])] == [
        Outcome.STALE_ATTEMPT
    ]
    await state_api.start([new])
    # ...and again while it runs.
    assert [h.outcome for h in await state_api.heartbeat([old])] == [Outcome.STALE_ATTEMPT]
    [old_fail] = await state_api.fail([StepFailure(old, "old worker gave up")])
    assert (old_fail.outcome, old_fail.status) == (Outcome.STALE_ATTEMPT, "IN_PROGRESS")
    assert [c.outcome for c in await state_api.complete([StepResult(old, {"domain": "old"})])] == [
        Outcome.STALE_ATTEMPT
    ]
    assert [r.outcome for r in await state_api.release([old], "x")] == [Outcome.STALE_ATTEMPT]

    [accepted] = await state_api.complete([StepResult(new, {"domain": "new"})])

    assert accepted.outcome is Outcome.OK
    [stored] = await results(conn, "normalize_domain_results", batch_id)
    assert (stored["attempt"], stored["domain"]) == (2, "new")
    assert (await state(conn, new))["status"] == "COMPLETED"
    # Still refused once the row is finished.
    assert [c.outcome for c in await state_api.complete([StepResult(old, {"domain": "old"})])] == [
        Outcome.STALE_ATTEMPT
    ]
    assert len(await results(conn, "normalize_domain_results", batch_id)) == 1


async def test_unknown_rows_are_not_found(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(0)])
    [item_id] = await item_ids(conn, batch_id)
    unknown = [
        TaskRef(uuid.uuid4(), uuid.uuid4(), "normalize_domain", 1),  # no such batch or item
        TaskRef(batch_id, uuid.uuid4(), "normalize_domain", 1),  # no such item
        TaskRef(batch_id, item_id, "clean_company_name", 1),  # step not seeded (yet)
        TaskRef(batch_id, item_id, "no_such_step", 1),
    ]
    expected = {t: Outcome.NOT_FOUND for t in unknown}

    assert outcomes(await state_api.start(unknown)) == expected
    assert outcomes(await state_api.complete([StepResult(t, {}) for t in unknown])) == expected
    assert outcomes(await state_api.heartbeat(unknown)) == expected
    assert outcomes(await state_api.release(unknown, "x")) == expected
    failed = await state_api.fail([StepFailure(t, "x") for t in unknown])
    assert outcomes(failed) == expected
    assert {f.status for f in failed} == {None}
    assert await state_api.mark_dispatched([(t, "call") for t in unknown]) == 0
    [row] = await states(conn, batch_id)
    assert (row["status"], row["attempt"]) == ("PENDING", 0)


async def test_unknown_batch_raises_not_found(state_api: StateAPI) -> None:
    missing = uuid.uuid4()
    with pytest.raises(NotFound, match=str(missing)):
        await state_api.retry_failed(missing)
    with pytest.raises(NotFound, match=str(missing)):
        await state_api.retry_failed(missing, "step_a")
    with pytest.raises(NotFound, match=str(missing)):
        await state_api.cancel_batch(missing)
    with pytest.raises(NotFound, match=str(missing)):
        await state_api.batch_progress(missing)


async def test_retry_failed_of_a_step_outside_the_blueprint_is_invalid(
    state_api: StateAPI, conn: Conn
) -> None:
    batch_id = await state_api.create_batch(["step_a"], [company(0)])
    [task] = await claim_and_start(state_api, batch_id)
    await state_api.fail([StepFailure(task, "no", retryable=False)])

    with pytest.raises(InvalidInput, match='step "step_b" is not in the blueprint'):
        await state_api.retry_failed(batch_id, "step_b")

    assert (await state(conn, task))["status"] == "FAILED"
    assert (await state_api.batch_progress(batch_id)).status == "FAILED"


async def test_claim_limit_out_of_range_is_invalid(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(["step_a"], [company(0)])

    for limit in (0, -1, 50_001):
        with pytest.raises(InvalidInput, match="claim limit"):
            await state_api.claim(limit)

    assert {r["status"] for r in await states(conn, batch_id)} == {"PENDING"}


async def test_empty_bulk_calls_return_nothing(state_api: StateAPI) -> None:
    assert await state_api.start([]) == []
    assert await state_api.complete([]) == []
    assert await state_api.fail([]) == []
    assert await state_api.heartbeat([]) == []
    assert await state_api.release([], "x") == []
    assert await state_api.mark_dispatched([]) == 0


# Bad arguments reach the SQL functions only through raw SQL: every implementation builds them
# from typed Python values.
TASK_FUNCTIONS = [
    "start_steps",
    "complete_steps",
    "fail_steps",
    "heartbeat_steps",
    "release_steps",
    "mark_dispatched",
]
GOOD = {
    "batch_id": "00000000-0000-0000-0000-000000000001",
    "item_id": "00000000-0000-0000-0000-000000000002",
    "step_name": "step_a",
    "attempt": 1,
}
BAD_ARGUMENTS: list[tuple[str, Any, str]] = [
    ("object", {"tasks": [GOOD]}, "expected a JSON array"),
    ("string", "step_a", "expected a JSON array"),
    ("sql null", None, "expected a JSON array"),
    ("not an object", [GOOD, 1], "every task needs"),
    ("no attempt", [{k: v for k, v in GOOD.items() if k != "attempt"}], "every task needs"),
    ("no item_id", [{k: v for k, v in GOOD.items() if k != "item_id"}], "every task needs"),
    ("attempt as text", [{**GOOD, "attempt": "1"}], "every task needs"),
    ("step as number", [{**GOOD, "step_name": 7}], "every task needs"),
]


@pytest.mark.parametrize("function", TASK_FUNCTIONS)
async def test_malformed_task_arrays_are_invalid(conn: Conn, function: str) -> None:
    query = sql.SQL("select * from public.{}(%s)").format(sql.Identifier(function))
    for name, payload, message in BAD_ARGUMENTS:
        argument = None if payload is None else Jsonb(payload)
        with pytest.raises(psycopg.Error, match=message) as caught:
            await conn.execute(query, (argument,))
        assert caught.value.sqlstate == "22023", name


async def test_a_result_that_is_not_an_object_is_invalid(conn: Conn) -> None:
    for result in ([1, 2], "done", 3):
        with pytest.raises(psycopg.Error, match="every result must be a JSON object") as caught:
            await conn.execute(
                "select * from complete_steps(%s)", (Jsonb([{**GOOD, "result": result}]),)
            )
        assert caught.value.sqlstate == "22023"


async def test_bulk_complete_with_mixed_rows(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(i) for i in range(3)])
    claimed = tasks(await claim_all(state_api, batch_id))
    running, stale_row, queued = claimed
    await state_api.start([running, stale_row])
    stale = with_attempt(stale_row, 0)
    missing = TaskRef(batch_id, uuid.uuid4(), "normalize_domain", 1)

    answers = await state_api.complete(
        [StepResult(t, {"domain": "d.example"}) for t in (running, queued, stale, missing)]
    )

    assert len(answers) == 4
    assert outcomes(answers) == {
        running: Outcome.OK,
        queued: Outcome.WRONG_STATUS,
        stale: Outcome.STALE_ATTEMPT,
        missing: Outcome.NOT_FOUND,
    }
    assert (await state(conn, running))["status"] == "COMPLETED"
    assert (await state(conn, stale_row))["status"] == "IN_PROGRESS"
    assert (await state(conn, queued))["status"] == "QUEUED"
    [stored] = await results(conn, "normalize_domain_results", batch_id)
    assert stored["item_id"] == running.item_id
    assert [r["item_id"] for r in await states(conn, batch_id, "clean_company_name")] == [
        running.item_id
    ]


async def test_bulk_start_fail_and_heartbeat_with_mixed_rows(
    state_api: StateAPI, conn: Conn
) -> None:
    await register_step(conn, "flaky", {"max_attempts": 2, "backoff_seconds": 0})
    batch_id = await state_api.create_batch(["flaky"], [company(i) for i in range(4)])
    claimed = tasks(await claim_all(state_api, batch_id))
    running, queued, finished, other = claimed
    await state_api.start([running, finished])
    await state_api.complete([StepResult(finished, {})])
    missing = TaskRef(batch_id, uuid.uuid4(), "flaky", 1)
    stale = with_attempt(other, 2)

    started = await state_api.start([running, queued, finished, stale, missing])
    assert outcomes(started) == {
        running: Outcome.OK,  # a repeated start
        queued: Outcome.OK,
        finished: Outcome.WRONG_STATUS,
        stale: Outcome.STALE_ATTEMPT,
        missing: Outcome.NOT_FOUND,
    }
    raw = {s.task: s.raw_data for s in started}
    assert raw[queued] is not None and raw[finished] is None and raw[missing] is None

    beats = await state_api.heartbeat([running, other, finished, missing])
    assert outcomes(beats) == {
        running: Outcome.OK,
        other: Outcome.WRONG_STATUS,  # still QUEUED
        finished: Outcome.WRONG_STATUS,
        missing: Outcome.NOT_FOUND,
    }

    failed = await state_api.fail(
        [
            StepFailure(running, "retry me"),
            StepFailure(queued, "give up", retryable=False),
            StepFailure(finished, "too late"),
            StepFailure(stale, "wrong attempt"),
            StepFailure(missing, "who?"),
        ]
    )
    assert {f.task: (f.outcome, f.status) for f in failed} == {
        running: (Outcome.OK, "PENDING"),
        queued: (Outcome.OK, "FAILED"),
        finished: (Outcome.WRONG_STATUS, "COMPLETED"),
        stale: (Outcome.STALE_ATTEMPT, "QUEUED"),
        missing: (Outcome.NOT_FOUND, None),
    }
    assert (await state(conn, other))["status"] == "QUEUED"
    assert "last_error" not in (await state(conn, other))["meta"]


async def test_registry_refuses_invalid_config(conn: Conn) -> None:
    bad_configs: list[tuple[dict[str, Any], str]] = [
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 1.5}, "max_attempts"),
        ({"timeout_seconds": 0}, "timeout_seconds"),
        ({"backoff_seconds": "soon"}, "backoff_seconds"),
        ({"backoff_jitter": 2}, "backoff_jitter"),
        ({"backoff_multiplier": 0.5}, "backoff_multiplier"),
    ]
    for config, key in bad_configs:
        with pytest.raises(psycopg.Error, match=f"config.{key}") as caught:
            await register_step(conn, "bad_config", config)
        assert caught.value.sqlstate == "22023"
    with pytest.raises(psycopg.Error, match="does not exist") as missing:
        await register_step(conn, "bad_table", {}, results_table="no_such_results")
    assert missing.value.sqlstate == "22023"


async def test_a_registered_results_table_can_be_written_by_complete(
    state_api: StateAPI, conn: Conn
) -> None:
    await conn.execute(
        "create table public.bare_results (batch_id uuid not null, item_id uuid not null,"
        " attempt integer not null, result jsonb not null, primary key (batch_id, item_id))"
    )
    try:
        await register_step(conn, "bare", {}, results_table="bare_results")
    except psycopg.Error as refused:  # refusing the table at registration is a fine answer
        assert refused.sqlstate == "22023"
        return
    # Accepted: then completing the step must work.
    batch_id = await state_api.create_batch(["bare"], [company(0)])
    [task] = await claim_and_start(state_api, batch_id)

    [done] = await state_api.complete([StepResult(task, {"x": 1})])

    assert done.ok
    assert [r["result"] for r in await results(conn, "bare_results", batch_id)] == [{"x": 1}]
