"""Every accepted transition of the row state machine, and the batch roll-up that follows it.

PENDING -> QUEUED (claim) -> IN_PROGRESS (start) -> COMPLETED (complete) | PENDING/FAILED (fail),
plus heartbeat, sweep, retry_failed, cancel, release and mark_dispatched.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from shared.state_api import Outcome, StateAPI, StepFailure, StepResult, TaskRef

from . import (
    TWO_STEPS,
    Conn,
    batch_row,
    claim_all,
    claim_and_start,
    company,
    configure_step,
    counts,
    db_now,
    expire_leases,
    fetch_one,
    item_ids,
    make_ready,
    outcomes,
    register_step,
    results,
    run_wave,
    state,
    states,
    tasks,
)

DOMAIN_RESULT = {
    "domain": "company0.example",
    "domain_unicode": "company0.example",
    "host": "www.company0.example",
    "source_field": "website",
}


async def test_create_batch_seeds_first_step_pending_for_every_item(
    state_api: StateAPI, conn: Conn
) -> None:
    items = [company(i) for i in range(5)]
    batch_id = await state_api.create_batch(TWO_STEPS, items, name="leads")

    rows = await states(conn, batch_id)
    assert [r["raw_data"] for r in rows] == items  # one row per item, in input order
    for row in rows:
        assert row["step_name"] == "normalize_domain"
        assert row["step_index"] == 0
        assert row["status"] == "PENDING"
        assert row["attempt"] == 0
        assert row["lease_expires_at"] is None

    progress = await state_api.batch_progress(batch_id)
    assert progress.batch_id == batch_id
    assert progress.name == "leads"
    assert progress.status == "PENDING"
    assert progress.items == 5
    assert progress.cancelled is False
    assert list(progress.steps) == list(TWO_STEPS)
    assert progress.steps == {"normalize_domain": counts(PENDING=5), "clean_company_name": counts()}
    assert not progress.finished
    assert progress.items_completed == 0


async def test_claim_queues_rows_and_starts_the_batch(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(i) for i in range(3)])
    assert (await batch_row(conn, batch_id))["started_at"] is None

    claimed = await state_api.claim(10, batch_ids=[batch_id])
    now = await db_now(conn)

    assert {c.task.item_id for c in claimed} == set(await item_ids(conn, batch_id))
    for c in claimed:
        assert c.task.batch_id == batch_id
        assert c.task.step_name == "normalize_domain"
        assert c.task.attempt == 1
        assert c.function_name == "normalize_domain"
        assert c.step_type == "SYNC"
        # The registry's timeout_seconds (60) from the claim.
        assert timedelta(seconds=50) < c.lease_expires_at - now <= timedelta(seconds=60)
        row = await state(conn, c.task)
        assert row["status"] == "QUEUED"
        assert row["attempt"] == 1
        assert row["lease_expires_at"] == c.lease_expires_at

    batch = await batch_row(conn, batch_id)
    assert batch["status"] == "IN_PROGRESS"
    assert batch["started_at"] is not None
    progress = await state_api.batch_progress(batch_id)
    assert progress.status == "IN_PROGRESS"
    assert progress.steps["normalize_domain"] == counts(QUEUED=3)
    # Nothing is left to claim.
    assert await state_api.claim(10, batch_ids=[batch_id]) == []


async def test_claim_honours_limit_and_filters(state_api: StateAPI, conn: Conn) -> None:
    first = await state_api.create_batch(["step_a"], [company(i) for i in range(3)])
    second = await state_api.create_batch(["step_b"], [company(i) for i in range(2)])
    first_items = set(await item_ids(conn, first))

    two = await state_api.claim(2, batch_ids=[first])
    assert len(two) == 2
    assert {c.task.item_id for c in two} < first_items

    only_b = await state_api.claim(10, step_names=["step_b"])
    assert {c.task.batch_id for c in only_b} == {second}
    assert {c.function_name for c in only_b} == {"step_b"}
    assert len(only_b) == 2

    rest = await state_api.claim(10)
    assert [(c.task.batch_id, c.task.item_id) for c in rest] == [
        (first, *(first_items - {c.task.item_id for c in two}))
    ]
    assert await state_api.claim(10) == []


async def test_claim_takes_a_clients_batches_in_turn(state_api: StateAPI, conn: Conn) -> None:
    # Not oldest first any more (issue 9): a newer batch never waits for an older one to drain.
    older = await state_api.create_batch(["step_a"], [company(i) for i in range(3)])
    newer = await state_api.create_batch(["step_a"], [company(i) for i in range(3)])

    claimed = Counter(c.task.batch_id for c in await state_api.claim(4))

    assert claimed == {older: 2, newer: 2}


async def test_claim_takes_a_batchs_items_in_input_order(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(["step_a"], [company(i) for i in range(6)])
    items = await item_ids(conn, batch_id)

    claimed = [c.task.item_id for c in await state_api.claim(3, batch_ids=[batch_id])]

    assert sorted(items.index(i) for i in claimed) == [0, 1, 2]


async def test_start_returns_input_and_config(state_api: StateAPI, conn: Conn) -> None:
    item = company(7)
    batch_id = await state_api.create_batch(TWO_STEPS, [item])
    [claimed] = await claim_all(state_api, batch_id)
    queued = await state(conn, claimed.task)

    [started] = await state_api.start([claimed.task])

    assert started.outcome is Outcome.OK and started.ok
    assert started.task == claimed.task
    assert started.raw_data == item
    registry = await fetch_one(
        conn, "select config from enrichment_registry where step_name = 'normalize_domain'"
    )
    assert started.config == registry["config"]
    row = await state(conn, claimed.task)
    assert row["status"] == "IN_PROGRESS"
    assert row["attempt"] == 1
    assert row["started_at"] is not None
    assert row["lease_expires_at"] >= queued["lease_expires_at"]


async def test_repeated_start_of_the_same_attempt_is_accepted(
    state_api: StateAPI, conn: Conn
) -> None:
    item = company(1)
    batch_id = await state_api.create_batch(TWO_STEPS, [item])
    [task] = await claim_and_start(state_api, batch_id)
    first = await state(conn, task)

    [again] = await state_api.start([task])

    assert again.outcome is Outcome.OK
    assert again.raw_data == item
    row = await state(conn, task)
    assert row["status"] == "IN_PROGRESS"
    assert row["attempt"] == 1
    assert row["started_at"] == first["started_at"]  # the first start time is kept
    assert row["lease_expires_at"] >= first["lease_expires_at"]


async def test_complete_writes_one_result_and_seeds_the_next_step(
    state_api: StateAPI, conn: Conn
) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(0), company(1)])
    started = await claim_and_start(state_api, batch_id)
    first_item = (await item_ids(conn, batch_id))[0]
    [done_task] = [t for t in started if t.item_id == first_item]
    [other_task] = [t for t in started if t.item_id != first_item]

    [done] = await state_api.complete([StepResult(done_task, DOMAIN_RESULT)])

    assert done.outcome is Outcome.OK and done.task == done_task
    row = await state(conn, done_task)
    assert row["status"] == "COMPLETED"
    assert row["finished_at"] is not None
    assert row["lease_expires_at"] is None

    [stored] = await results(conn, "normalize_domain_results", batch_id)
    assert stored["item_id"] == first_item
    assert stored["attempt"] == 1
    assert stored["result"] == DOMAIN_RESULT
    # Typed columns derived from the result object.
    assert stored["domain"] == "company0.example"
    assert stored["host"] == "www.company0.example"
    assert stored["source_field"] == "website"

    next_rows = await states(conn, batch_id, "clean_company_name")
    assert [(r["item_id"], r["status"], r["step_index"], r["attempt"]) for r in next_rows] == [
        (first_item, "PENDING", 1, 0)
    ]
    assert (await state(conn, other_task))["status"] == "IN_PROGRESS"
    assert (await state_api.batch_progress(batch_id)).status == "IN_PROGRESS"


async def test_batch_completes_when_every_item_finished_the_blueprint(
    state_api: StateAPI, conn: Conn
) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(i) for i in range(4)])

    await run_wave(state_api, batch_id, DOMAIN_RESULT)
    mid = await state_api.batch_progress(batch_id)
    assert mid.status == "IN_PROGRESS"
    assert mid.steps == {
        "normalize_domain": counts(COMPLETED=4),
        "clean_company_name": counts(PENDING=4),
    }
    assert (await batch_row(conn, batch_id))["finished_at"] is None

    second_wave = await run_wave(state_api, batch_id, {"name": "Company", "original_name": "X"})
    assert {t.step_name for t in second_wave} == {"clean_company_name"}

    progress = await state_api.batch_progress(batch_id)
    assert progress.status == "COMPLETED"
    assert progress.finished
    assert progress.items_completed == 4
    assert progress.items_failed == 0
    assert (await batch_row(conn, batch_id))["finished_at"] is not None
    cleaned = await results(conn, "clean_company_name_results", batch_id)
    assert [r["name"] for r in cleaned] == ["Company"] * 4
    assert len(await results(conn, "normalize_domain_results", batch_id)) == 4


async def test_retryable_failure_goes_back_to_pending_with_backoff(
    state_api: StateAPI, conn: Conn
) -> None:
    await configure_step(conn, "normalize_domain", backoff_seconds=100, backoff_jitter=0)
    batch_id = await state_api.create_batch(TWO_STEPS, [company(0)])
    [task] = await claim_and_start(state_api, batch_id)

    [failed] = await state_api.fail([StepFailure(task, "HTTP 503 from the API")])

    assert failed.outcome is Outcome.OK and failed.ok
    assert failed.status == "PENDING"
    row = await state(conn, task)
    assert row["status"] == "PENDING"
    assert row["attempt"] == 1
    assert row["lease_expires_at"] is None
    wait = row["run_after"] - await db_now(conn)
    assert timedelta(seconds=95) < wait <= timedelta(seconds=100)
    last_error = row["meta"]["last_error"]
    assert last_error["message"] == "HTTP 503 from the API"
    assert last_error["attempt"] == 1
    assert last_error["will_retry"] is True
    assert "error" not in row["meta"]
    # Not ready before its backoff passes.
    assert await state_api.claim(10, batch_ids=[batch_id]) == []
    assert (await state_api.batch_progress(batch_id)).status == "IN_PROGRESS"


async def test_backoff_grows_by_the_multiplier_up_to_the_cap(
    state_api: StateAPI, conn: Conn
) -> None:
    await register_step(
        conn,
        "backoff_probe",
        {
            "max_attempts": 10,
            "backoff_seconds": 10,
            "backoff_multiplier": 3,
            "backoff_max_seconds": 50,
            "backoff_jitter": 0,
        },
    )
    batch_id = await state_api.create_batch(["backoff_probe"], [company(0)])
    waits: list[float] = []
    for _ in range(3):
        await make_ready(conn, batch_id)
        [task] = await claim_and_start(state_api, batch_id)
        [failed] = await state_api.fail([StepFailure(task, "rate limited")])
        assert failed.status == "PENDING"
        row = await state(conn, task)
        waits.append((row["run_after"] - row["updated_at"]).total_seconds())
    assert [round(w) for w in waits] == [10, 30, 50]


async def test_failure_after_max_attempts_is_terminal(state_api: StateAPI, conn: Conn) -> None:
    await register_step(conn, "flaky", {"max_attempts": 2, "backoff_seconds": 0})
    batch_id = await state_api.create_batch(["flaky"], [company(0), company(1)])
    items = await item_ids(conn, batch_id)
    started = await claim_and_start(state_api, batch_id)
    [good] = [t for t in started if t.item_id == items[0]]
    [bad] = [t for t in started if t.item_id == items[1]]
    await state_api.complete([StepResult(good, {"ok": True})])

    [first] = await state_api.fail([StepFailure(bad, "timeout talking to the API")])
    assert first.status == "PENDING"
    [retry] = await claim_and_start(state_api, batch_id)
    assert retry.item_id == bad.item_id and retry.attempt == 2
    [second] = await state_api.fail([StepFailure(retry, "timeout again")])

    assert second.outcome is Outcome.OK
    assert second.status == "FAILED"
    row = await state(conn, retry)
    assert row["status"] == "FAILED"
    assert row["finished_at"] is not None
    assert row["meta"]["error"] == "timeout again"
    assert row["meta"]["last_error"]["will_retry"] is False
    assert row["meta"]["last_error"]["attempt"] == 2

    progress = await state_api.batch_progress(batch_id)
    assert progress.status == "FAILED"
    assert progress.finished
    # Partial success stays visible.
    assert progress.steps == {"flaky": counts(COMPLETED=1, FAILED=1)}
    assert progress.items_completed == 1
    assert progress.items_failed == 1
    assert (await batch_row(conn, batch_id))["finished_at"] is not None


async def test_terminal_failure_fails_at_once_and_the_batch_waits_for_the_rest(
    state_api: StateAPI, conn: Conn
) -> None:
    batch_id = await state_api.create_batch(["step_a"], [company(0), company(1)])
    items = await item_ids(conn, batch_id)
    started = await claim_and_start(state_api, batch_id)
    [good] = [t for t in started if t.item_id == items[0]]
    [bad] = [t for t in started if t.item_id == items[1]]

    # step_a allows 3 attempts: a non-retryable error uses none of the rest.
    [failed] = await state_api.fail([StepFailure(bad, "404: no such company", retryable=False)])

    assert failed.status == "FAILED"
    row = await state(conn, bad)
    assert (row["status"], row["attempt"]) == ("FAILED", 1)
    assert row["meta"]["error"] == "404: no such company"
    # One item is still running: the batch is not finished.
    assert (await state_api.batch_progress(batch_id)).status == "IN_PROGRESS"

    await state_api.complete([StepResult(good, {"slept_ms": 1})])
    progress = await state_api.batch_progress(batch_id)
    assert progress.status == "FAILED"
    assert progress.steps == {"step_a": counts(COMPLETED=1, FAILED=1)}
    [stored] = await results(conn, "step_a_results", batch_id)
    assert stored["slept_ms"] == 1


async def test_heartbeat_extends_the_lease(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(0)])
    [task] = await claim_and_start(state_api, batch_id)
    await conn.execute(
        "update workflow_states set lease_expires_at = now() + interval '1 second'"
        " where batch_id = %s",
        (batch_id,),
    )

    [beat] = await state_api.heartbeat([task])

    assert beat.outcome is Outcome.OK and beat.task == task
    row = await state(conn, task)
    assert row["status"] == "IN_PROGRESS"
    assert row["lease_expires_at"] - await db_now(conn) > timedelta(seconds=50)


async def test_retry_failed_gives_a_fresh_budget_and_attempts_keep_increasing(
    state_api: StateAPI, conn: Conn
) -> None:
    await register_step(conn, "flaky", {"max_attempts": 2, "backoff_seconds": 0})
    batch_id = await state_api.create_batch(["flaky"], [company(i) for i in range(3)])
    started = await claim_and_start(state_api, batch_id)
    await state_api.fail([StepFailure(t, "bad gateway", retryable=False) for t in started])
    assert (await state_api.batch_progress(batch_id)).status == "FAILED"

    assert await state_api.retry_failed(batch_id) == 3

    for row in await states(conn, batch_id):
        assert row["status"] == "PENDING"
        assert row["attempt"] == 1
        assert "error" not in row["meta"]
        assert row["finished_at"] is None
    progress = await state_api.batch_progress(batch_id)
    assert progress.status == "IN_PROGRESS"
    assert progress.steps == {"flaky": counts(PENDING=3)}
    assert (await batch_row(conn, batch_id))["finished_at"] is None

    second = await claim_and_start(state_api, batch_id)
    assert {t.attempt for t in second} == {2}
    # A fresh budget of 2: the first retryable failure after retry_failed is retried.
    assert {f.status for f in await state_api.fail([StepFailure(t, "x") for t in second])} == {
        "PENDING"
    }
    third = await claim_and_start(state_api, batch_id)
    assert {t.attempt for t in third} == {3}
    assert {f.status for f in await state_api.fail([StepFailure(t, "y") for t in third])} == {
        "FAILED"
    }
    assert (await state_api.batch_progress(batch_id)).status == "FAILED"


async def test_retry_failed_of_one_step(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(["step_a", "step_b"], [company(i) for i in range(3)])
    items = await item_ids(conn, batch_id)
    step_a = await claim_and_start(state_api, batch_id)
    a_fails = [t for t in step_a if t.item_id == items[0]]
    await state_api.fail([StepFailure(t, "no", retryable=False) for t in a_fails])
    await state_api.complete([StepResult(t, {}) for t in step_a if t.item_id != items[0]])
    step_b = await claim_and_start(state_api, batch_id)
    b_fails = [t for t in step_b if t.item_id == items[1]]
    await state_api.fail([StepFailure(t, "no", retryable=False) for t in b_fails])
    await state_api.complete([StepResult(t, {}) for t in step_b if t.item_id != items[1]])
    assert (await state_api.batch_progress(batch_id)).status == "FAILED"

    assert await state_api.retry_failed(batch_id, "step_b") == 1

    progress = await state_api.batch_progress(batch_id)
    assert progress.status == "IN_PROGRESS"
    assert progress.steps == {
        "step_a": counts(COMPLETED=2, FAILED=1),
        "step_b": counts(COMPLETED=1, PENDING=1),
    }
    [b_retry] = await run_wave(state_api, batch_id)
    assert (b_retry.item_id, b_retry.step_name, b_retry.attempt) == (items[1], "step_b", 2)
    progress = await state_api.batch_progress(batch_id)
    assert progress.status == "FAILED"  # item 0 still failed step_a
    assert progress.items_completed == 2

    assert await state_api.retry_failed(batch_id, "step_a") == 1
    [a_retry] = await run_wave(state_api, batch_id)
    assert (a_retry.item_id, a_retry.step_name) == (items[0], "step_a")
    await run_wave(state_api, batch_id)
    progress = await state_api.batch_progress(batch_id)
    assert progress.status == "COMPLETED"
    assert progress.items_completed == 3

    assert await state_api.retry_failed(batch_id) == 0
    assert (await state_api.batch_progress(batch_id)).status == "COMPLETED"


async def test_cancel_fails_active_rows_and_refuses_late_calls(
    state_api: StateAPI, conn: Conn
) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(i) for i in range(4)])
    # One item's step 1 COMPLETED (its step 2 PENDING), one IN_PROGRESS, one QUEUED, one PENDING.
    [done] = await claim_and_start(state_api, batch_id, limit=1)
    await state_api.complete([StepResult(done, DOMAIN_RESULT)])
    [running] = await claim_and_start(state_api, batch_id, limit=1)
    [queued] = tasks(await claim_all(state_api, batch_id, limit=1))
    before = {(r["item_id"], r["step_name"]): r["status"] for r in await states(conn, batch_id)}
    assert sorted(before.values()) == sorted(
        ["COMPLETED", "PENDING", "IN_PROGRESS", "QUEUED", "PENDING"]
    )

    assert await state_api.cancel_batch(batch_id) == 4

    rows = await states(conn, batch_id)
    after = {(r["item_id"], r["step_name"]): r["status"] for r in rows}
    assert after == {
        key: "COMPLETED" if status == "COMPLETED" else "FAILED" for key, status in before.items()
    }
    for row in rows:
        if row["status"] == "FAILED":
            assert row["meta"]["error"] == "cancelled"
            assert row["lease_expires_at"] is None
    progress = await state_api.batch_progress(batch_id)
    assert progress.status == "FAILED"
    assert progress.cancelled is True
    assert progress.finished
    assert (await batch_row(conn, batch_id))["cancelled_at"] is not None

    # Late worker calls change nothing.
    late = StepResult(running, DOMAIN_RESULT)
    assert [o.outcome for o in await state_api.complete([late])] == [Outcome.WRONG_STATUS]
    assert [o.outcome for o in await state_api.start([queued])] == [Outcome.WRONG_STATUS]
    assert [o.outcome for o in await state_api.heartbeat([running])] == [Outcome.WRONG_STATUS]
    [late_fail] = await state_api.fail([StepFailure(running, "late")])
    assert (late_fail.outcome, late_fail.status) == (Outcome.WRONG_STATUS, "FAILED")
    assert len(await results(conn, "normalize_domain_results", batch_id)) == 1
    assert (await state(conn, running))["meta"]["error"] == "cancelled"
    assert await state_api.claim(10, batch_ids=[batch_id]) == []
    # Cancelling again finds nothing to cancel.
    assert await state_api.cancel_batch(batch_id) == 0
    assert (await state_api.batch_progress(batch_id)).cancelled is True


async def test_retry_failed_resumes_a_cancelled_batch(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(["step_a"], [company(0), company(1)])
    assert await state_api.cancel_batch(batch_id) == 2

    assert await state_api.retry_failed(batch_id) == 2

    progress = await state_api.batch_progress(batch_id)
    assert (progress.status, progress.cancelled) == ("IN_PROGRESS", False)
    await run_wave(state_api, batch_id)
    assert (await state_api.batch_progress(batch_id)).status == "COMPLETED"


async def test_sweep_retries_expired_leases_then_fails_them(
    state_api: StateAPI, conn: Conn
) -> None:
    await register_step(conn, "slow", {"max_attempts": 2, "backoff_seconds": 0})
    batch_id = await state_api.create_batch(["slow"], [company(0), company(1)])
    items = await item_ids(conn, batch_id)
    claimed = tasks(await claim_all(state_api, batch_id))
    in_progress = [t for t in claimed if t.item_id == items[0]]
    await state_api.start(in_progress)

    # Live leases are left alone.
    assert await state_api.sweep_expired_leases() == []
    assert {r["status"] for r in await states(conn, batch_id)} == {"QUEUED", "IN_PROGRESS"}

    assert await expire_leases(conn, batch_id) == 2
    swept = await state_api.sweep_expired_leases()

    assert sorted((s.task.item_id, s.task.attempt, s.status) for s in swept) == sorted(
        [(items[0], 1, "PENDING"), (items[1], 1, "PENDING")]
    )
    rows = await states(conn, batch_id)
    assert [r["status"] for r in rows] == ["PENDING", "PENDING"]
    assert [r["lease_expires_at"] for r in rows] == [None, None]
    # The started row used its attempt; the row that never started got it back.
    assert rows[0]["meta"]["last_error"]["kind"] == "lease_expired"
    assert "IN_PROGRESS" in rows[0]["meta"]["last_error"]["message"]
    assert (rows[0]["retry_from"], rows[1]["retry_from"]) == (0, 1)
    assert "last_error" not in rows[1]["meta"]
    assert "never started" in rows[1]["meta"]["released"]["reason"]
    assert rows[1]["meta"]["lease_refunds"] == 1

    again = tasks(await claim_all(state_api, batch_id))
    assert {t.attempt for t in again} == {2}
    await state_api.start([t for t in again if t.item_id == items[0]])
    assert await expire_leases(conn, batch_id) == 2
    final = await state_api.sweep_expired_leases()

    assert sorted((s.task.item_id, s.task.attempt, s.status) for s in final) == sorted(
        [(items[0], 2, "FAILED"), (items[1], 2, "PENDING")]
    )
    failed, refunded = await states(conn, batch_id)
    assert failed["status"] == "FAILED"
    assert "lease expired" in failed["meta"]["error"]
    assert (refunded["status"], refunded["retry_from"]) == ("PENDING", 2)
    progress = await state_api.batch_progress(batch_id)
    assert progress.steps == {"slow": counts(FAILED=1, PENDING=1)}


async def test_a_row_that_never_starts_is_refunded_three_times_then_counts(
    state_api: StateAPI, conn: Conn
) -> None:
    """A worker that never comes up must not keep a row alive forever."""
    await register_step(conn, "slow", {"max_attempts": 1, "backoff_seconds": 0})
    batch_id = await state_api.create_batch(["slow"], [company(0)])
    statuses = []
    for _ in range(4):
        assert len(await claim_all(state_api, batch_id)) == 1
        assert await expire_leases(conn, batch_id) == 1
        [swept] = await state_api.sweep_expired_leases()
        statuses.append(swept.status)
    assert statuses == ["PENDING", "PENDING", "PENDING", "FAILED"]
    [row] = await states(conn, batch_id)
    assert "lease expired while QUEUED" in row["meta"]["error"]
    assert (await state_api.batch_progress(batch_id)).status == "FAILED"


async def test_sweep_rolls_up_a_batch_left_with_nothing_to_run(
    state_api: StateAPI, conn: Conn
) -> None:
    batch_id = await state_api.create_batch(["step_a"], [company(0), company(1)])
    items = await item_ids(conn, batch_id)
    started = await claim_and_start(state_api, batch_id)
    await state_api.complete([StepResult(t, {}) for t in started if t.item_id == items[0]])
    # The running item is deleted (say, in Studio): no transition will roll the batch up.
    await conn.execute("delete from batch_items where id = %s", (items[1],))
    assert (await state_api.batch_progress(batch_id)).status == "IN_PROGRESS"

    assert await state_api.sweep_expired_leases() == []

    progress = await state_api.batch_progress(batch_id)
    assert (progress.status, progress.items) == ("COMPLETED", 1)


async def test_release_hands_rows_back_and_refunds_the_attempt(
    state_api: StateAPI, conn: Conn
) -> None:
    await register_step(conn, "flaky", {"max_attempts": 2, "backoff_seconds": 0})
    batch_id = await state_api.create_batch(["flaky"], [company(0), company(1)])
    items = await item_ids(conn, batch_id)
    claimed = tasks(await claim_all(state_api, batch_id))
    await state_api.start([t for t in claimed if t.item_id == items[0]])  # one QUEUED, one running

    released = await state_api.release(claimed, "worker shut down (SIGTERM)")

    assert outcomes(released) == {t: Outcome.OK for t in claimed}
    for row in await states(conn, batch_id):
        assert (row["status"], row["attempt"], row["lease_expires_at"]) == ("PENDING", 1, None)
        assert row["started_at"] is None
        assert row["meta"]["released"]["reason"] == "worker shut down (SIGTERM)"
    # Released work is ready at once, under a new attempt number (fencing holds)...
    second = await claim_and_start(state_api, batch_id)
    assert {t.attempt for t in second} == {2}
    # ...and the released attempt did not count: with max_attempts 2 a failure is still retried.
    assert {f.status for f in await state_api.fail([StepFailure(t, "x") for t in second])} == {
        "PENDING"
    }


async def test_release_with_a_delay_holds_the_rows_back(state_api: StateAPI, conn: Conn) -> None:
    batch_id = await state_api.create_batch(["step_a"], [company(0)])
    claimed = tasks(await claim_all(state_api, batch_id))

    released = await state_api.release(claimed, "dispatch failed", delay_seconds=60)

    assert outcomes(released) == {t: Outcome.OK for t in claimed}
    [row] = await states(conn, batch_id)
    assert row["status"] == "PENDING"
    assert row["run_after"] - row["updated_at"] >= timedelta(seconds=59)
    assert await state_api.claim(10, batch_ids=[batch_id]) == []  # not before the delay


async def test_mark_dispatched_records_the_call_id_of_the_current_attempt(
    state_api: StateAPI, conn: Conn
) -> None:
    batch_id = await state_api.create_batch(["step_a"], [company(0), company(1)])
    first, second = tasks(await claim_all(state_api, batch_id))
    stale = TaskRef(second.batch_id, second.item_id, second.step_name, second.attempt + 1)

    marked = await state_api.mark_dispatched([(first, "fc-123"), (stale, "fc-999")])

    assert marked == 1
    dispatch = (await state(conn, first))["meta"]["dispatch"]
    assert (dispatch["call_id"], dispatch["attempt"]) == ("fc-123", 1)
    assert "dispatch" not in (await state(conn, second))["meta"]
    assert (await state(conn, first))["status"] == "QUEUED"


async def test_mark_dispatched_records_the_call_id_of_a_row_its_worker_already_finished(
    state_api: StateAPI, conn: Conn
) -> None:
    # A fast worker can complete a row before the conductor learns the call id from spawn.
    batch_id = await state_api.create_batch(TWO_STEPS, [company(0)])
    [task] = await claim_and_start(state_api, batch_id)
    await state_api.complete([StepResult(task, DOMAIN_RESULT)])

    assert await state_api.mark_dispatched([(task, "fc-fast")]) == 1

    row = await state(conn, task)
    assert (row["status"], row["meta"]["dispatch"]["call_id"]) == ("COMPLETED", "fc-fast")
