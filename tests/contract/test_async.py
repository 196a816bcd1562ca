"""The life of an ASYNC row (issue 7): submitted, awaiting its callback without a worker, then
completed or failed by the callback, or retried when no callback comes by the deadline."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from shared.state_api import Outcome, StateAPI, StepFailure, StepResult, StepSubmission

from . import Conn, claim_and_start, company, expire_leases, outcomes, state, with_attempt


async def register_async_step(conn: Conn, name: str, **config: Any) -> None:
    await conn.execute(
        "insert into enrichment_registry (step_name, type, modal_function_name, config)"
        " values (%s, 'ASYNC', %s, %s)",
        (name, name, Jsonb({"max_attempts": 2, "backoff_seconds": 0, **config})),
    )


async def test_a_submitted_row_awaits_its_callback_with_the_callback_deadline(
    state_api: StateAPI, conn: Conn
) -> None:
    await register_async_step(conn, "later", timeout_seconds=30, callback_timeout_seconds=7200)
    batch_id = await state_api.create_batch(["later"], [company(0)])
    [task] = await claim_and_start(state_api, batch_id)

    [answer] = await state_api.submit([StepSubmission(task, "req-1")])

    assert answer.ok
    row = await state(conn, task)
    assert row["status"] == "IN_PROGRESS"
    assert row["lease_owner"] is None
    assert row["meta"]["awaiting"]["request_id"] == "req-1"
    assert row["meta"]["awaiting"]["attempt"] == 1
    lease = (row["lease_expires_at"] - row["updated_at"]).total_seconds()
    assert 7100 < lease <= 7200
    # A late heartbeat of the worker that submitted it does not cut the deadline short.
    await state_api.heartbeat([task])
    assert (await state(conn, task))["lease_expires_at"] == row["lease_expires_at"]

    # The callback completes it like any completion; a replay changes nothing.
    [done] = await state_api.complete([StepResult(task, {"email": "a@b.example"})])
    assert done.ok and (await state(conn, task))["status"] == "COMPLETED"
    [again] = await state_api.complete([StepResult(task, {"email": "x@y.example"})])
    assert again.outcome is Outcome.WRONG_STATUS


async def test_a_callback_may_come_before_the_submission_is_recorded(
    state_api: StateAPI, conn: Conn
) -> None:
    await register_async_step(conn, "fast")
    batch_id = await state_api.create_batch(["fast"], [company(0)])
    [task] = await claim_and_start(state_api, batch_id)
    assert (await state_api.complete([StepResult(task, {})]))[0].ok

    [late] = await state_api.submit([StepSubmission(task, "req-1")])

    assert late.outcome is Outcome.WRONG_STATUS
    assert (await state(conn, task))["status"] == "COMPLETED"


async def test_no_callback_by_the_deadline_is_a_failed_attempt_then_failed(
    state_api: StateAPI, conn: Conn
) -> None:
    await register_async_step(conn, "silent", callback_timeout_seconds=60)
    batch_id = await state_api.create_batch(["silent"], [company(0)])
    [first] = await claim_and_start(state_api, batch_id)
    await state_api.submit([StepSubmission(first, "req-1")])
    await expire_leases(conn, batch_id)

    [swept] = await state_api.sweep_expired_leases()

    assert swept.status == "PENDING"
    row = await state(conn, first)
    assert row["meta"]["last_error"]["kind"] == "callback_timeout"
    message = row["meta"]["last_error"]["message"]
    assert message == "no callback within 60 s (attempt 1, request req-1)"

    # Re-submitted as attempt 2; the first submission's callback arrives late and is refused.
    [second] = await claim_and_start(state_api, batch_id)
    assert second == with_attempt(first, 2)
    await state_api.submit([StepSubmission(second, "req-2")])
    stale = await state_api.complete([StepResult(first, {"late": True})])
    assert outcomes(stale) == {first: Outcome.STALE_ATTEMPT}

    await expire_leases(conn, batch_id)
    [final] = await state_api.sweep_expired_leases()
    assert final.status == "FAILED"
    assert (await state(conn, first))["meta"]["error"].startswith("no callback within 60 s")


async def test_a_failure_callback_retries_or_fails_the_row(state_api: StateAPI, conn: Conn) -> None:
    await register_async_step(conn, "picky")
    batch_id = await state_api.create_batch(["picky"], [company(0), company(1)])
    retry, terminal = await claim_and_start(state_api, batch_id)
    await state_api.submit([StepSubmission(retry, "a"), StepSubmission(terminal, "b")])

    answers = await state_api.fail(
        [StepFailure(retry, "provider busy"), StepFailure(terminal, "no such company", False)]
    )

    assert [(a.outcome, a.status) for a in answers] == [
        (Outcome.OK, "PENDING"),
        (Outcome.OK, "FAILED"),
    ]


async def test_callback_timeout_must_be_a_positive_number(conn: Conn) -> None:
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="callback_timeout_seconds"):
        await register_async_step(conn, "bad", callback_timeout_seconds=0)


async def test_progress_counts_rows_awaiting_their_callback_apart(
    state_api: StateAPI, conn: Conn
) -> None:
    await register_async_step(conn, "later")
    batch_id = await state_api.create_batch(["later"], [company(i) for i in range(3)])
    submitted, running, _ = await claim_and_start(state_api, batch_id)
    await state_api.submit([StepSubmission(submitted, "req")])

    progress = await state_api.batch_progress(batch_id)

    assert progress.steps["later"]["IN_PROGRESS"] == 3
    assert progress.awaiting == {"later": 1}
    assert progress.running("later") == 2
    assert progress.to_json()["awaiting_callback"] == {"later": 1}
    assert running != submitted


async def test_start_hands_over_the_results_a_step_needs(state_api: StateAPI, conn: Conn) -> None:
    await conn.execute(
        "insert into enrichment_registry (step_name, modal_function_name, config)"
        " values ('uses_domain', 'uses_domain', %s)",
        (Jsonb({"needs": ["normalize_domain", "step_a"]}),),
    )
    batch_id = await state_api.create_batch(
        ["normalize_domain", "uses_domain"], [company(0), company(1)]
    )
    first = await claim_and_start(state_api, batch_id)
    [plain] = [s for s in await state_api.start(first) if s.task == first[0]]
    assert plain.inputs is None  # normalize_domain needs nothing
    results = [StepResult(t, {"domain": f"company{i}.example"}) for i, t in enumerate(first)]
    await state_api.complete(results)

    started = await state_api.start(await claim_and_start(state_api, batch_id))

    by_item = {s.task.item_id: s.inputs for s in started}
    assert by_item == {
        t.item_id: {"normalize_domain": {"domain": f"company{i}.example"}}
        for i, t in enumerate(first)
    }  # step_a has no result for these items: absent


async def test_needs_must_name_steps_with_results(conn: Conn) -> None:
    for needs, message in [
        ("normalize_domain", "must be a JSON array"),
        (["no_such_step"], "not a registered step"),
    ]:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message):
            await conn.execute(
                "insert into enrichment_registry (step_name, modal_function_name, config)"
                " values ('bad', 'bad', %s)",
                (Jsonb({"needs": needs}),),
            )
