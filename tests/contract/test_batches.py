"""Creating batches (blueprint and item validation, nothing written on refusal), batch roll-up."""

from __future__ import annotations

import uuid
from typing import Any, cast

import psycopg
import pytest
from psycopg.types.json import Jsonb

from shared.errors import InvalidInput
from shared.state_api import StateAPI, StepFailure, StepResult

from . import (
    TWO_STEPS,
    Conn,
    batch_row,
    claim_and_start,
    company,
    counts,
    fetch,
    item_ids,
    run_wave,
    states,
    table_count,
)

NIL_CLIENT = uuid.UUID(int=0)


async def assert_nothing_written(conn: Conn) -> None:
    for table in ("batches", "batch_items", "workflow_states"):
        assert await table_count(conn, table) == 0, table


BAD_BLUEPRINTS: list[tuple[list[Any], str]] = [
    (["no_such_step"], 'step "no_such_step" is not in enrichment_registry'),
    (["step_a", "no_such_step"], 'step "no_such_step" is not in enrichment_registry'),
    ([], "blueprint is empty"),
    (["step_a", "step_b", "step_a"], 'names step "step_a" more than once'),
    (["step_a", 1], "element 1 is not a step name"),
    (["step_a", None], "element null is not a step name"),
    ([["step_a"]], 'element \\["step_a"\\] is not a step name'),
]


async def test_bad_blueprints_are_refused_with_nothing_written(
    state_api: StateAPI, conn: Conn
) -> None:
    for blueprint, message in BAD_BLUEPRINTS:
        with pytest.raises(InvalidInput, match=message):
            await state_api.create_batch(cast(list[str], blueprint), [company(0), company(1)])
        await assert_nothing_written(conn)


async def test_unknown_step_error_lists_the_known_steps(state_api: StateAPI) -> None:
    with pytest.raises(InvalidInput) as caught:
        await state_api.create_batch(["normalise_domain"], [company(0)])
    assert "normalise_domain" in str(caught.value)
    assert "normalize_domain" in str(caught.value)  # the hint names what exists


async def test_blueprints_that_are_not_arrays_are_refused(conn: Conn) -> None:
    # The protocol takes a sequence of names, so a non-array reaches SQL only through raw calls.
    for blueprint in ({"steps": ["step_a"]}, "step_a", 1):
        with pytest.raises(psycopg.Error, match="blueprint must be a JSON array") as caught:
            await conn.execute(
                "select create_batch(%s, %s)", (Jsonb(blueprint), Jsonb([company(0)]))
            )
        assert caught.value.sqlstate == "22023"
        await assert_nothing_written(conn)


BAD_ITEMS: list[tuple[list[Any], str]] = [
    ([company(0), "acme.com", company(2)], "item 2 of 3 is not a JSON object"),
    ([[1, 2]], "item 1 of 1 is not a JSON object"),
    ([company(0), None], "item 2 of 2 is not a JSON object"),
    ([], "non-empty JSON array"),
]


async def test_items_that_are_not_objects_are_refused(state_api: StateAPI, conn: Conn) -> None:
    for items, message in BAD_ITEMS:
        with pytest.raises(InvalidInput, match=message):
            await state_api.create_batch(["step_a"], items)
        await assert_nothing_written(conn)


async def test_create_batch_stores_client_name_and_items_in_order(
    state_api: StateAPI, conn: Conn
) -> None:
    client = uuid.uuid4()
    items = [company(i) for i in range(10)]

    batch_id = await state_api.create_batch(TWO_STEPS, items, client_id=client, name="Q3 list")

    batch = await batch_row(conn, batch_id)
    assert batch["client_id"] == client
    assert batch["name"] == "Q3 list"
    assert batch["blueprint"] == list(TWO_STEPS)
    assert batch["item_count"] == 10
    assert batch["status"] == "PENDING"
    stored = await fetch(
        conn, "select raw_data from batch_items where batch_id = %s order by seq", (batch_id,)
    )
    assert [r["raw_data"] for r in stored] == items
    default = await state_api.create_batch(["step_a"], [company(0)])
    assert (await batch_row(conn, default))["client_id"] == NIL_CLIENT


async def test_batches_progress_independently(state_api: StateAPI, conn: Conn) -> None:
    first = await state_api.create_batch(["step_a"], [company(i) for i in range(2)])
    second = await state_api.create_batch(["step_a", "step_b"], [company(i) for i in range(3)])

    await run_wave(state_api, first)

    done = await state_api.batch_progress(first)
    waiting = await state_api.batch_progress(second)
    assert (done.status, done.items, done.steps) == (
        "COMPLETED",
        2,
        {"step_a": counts(COMPLETED=2)},
    )
    assert (waiting.status, waiting.items) == ("PENDING", 3)
    assert waiting.steps == {"step_a": counts(PENDING=3), "step_b": counts()}
    assert list(waiting.steps) == ["step_a", "step_b"]


async def test_one_bulk_call_rolls_up_each_batch_on_its_own(
    state_api: StateAPI, conn: Conn
) -> None:
    finishing = await state_api.create_batch(["step_a"], [company(0)])
    continuing = await state_api.create_batch(["step_a", "step_b"], [company(0)])
    failing = await state_api.create_batch(["step_a"], [company(0)])
    started = await state_api.claim(10)
    assert all(s.ok for s in await state_api.start([c.task for c in started]))
    by_batch = {c.task.batch_id: c.task for c in started}

    answers = await state_api.complete(
        [StepResult(by_batch[finishing], {}), StepResult(by_batch[continuing], {})]
    )
    assert all(a.ok for a in answers)
    await state_api.fail([StepFailure(by_batch[failing], "no", retryable=False)])

    assert (await state_api.batch_progress(finishing)).status == "COMPLETED"
    assert (await state_api.batch_progress(continuing)).status == "IN_PROGRESS"
    assert (await state_api.batch_progress(failing)).status == "FAILED"
    assert [r["step_name"] for r in await states(conn, continuing) if r["status"] == "PENDING"] == [
        "step_b"
    ]


async def test_partial_success_is_visible_in_progress_counts(
    state_api: StateAPI, conn: Conn
) -> None:
    batch_id = await state_api.create_batch(TWO_STEPS, [company(i) for i in range(5)])
    items = await item_ids(conn, batch_id)
    first = await claim_and_start(state_api, batch_id)
    fails_first = [t for t in first if t.item_id == items[0]]
    await state_api.fail([StepFailure(t, "no domain", retryable=False) for t in fails_first])
    await state_api.complete([StepResult(t, {}) for t in first if t.item_id != items[0]])
    second = await claim_and_start(state_api, batch_id)
    fails_second = [t for t in second if t.item_id == items[1]]
    await state_api.fail([StepFailure(t, "no name", retryable=False) for t in fails_second])
    await state_api.complete([StepResult(t, {}) for t in second if t.item_id != items[1]])

    progress = await state_api.batch_progress(batch_id)

    assert progress.status == "FAILED"
    assert progress.finished
    assert progress.steps == {
        "normalize_domain": counts(COMPLETED=4, FAILED=1),
        "clean_company_name": counts(COMPLETED=3, FAILED=1),
    }
    assert (progress.items, progress.items_completed, progress.items_failed) == (5, 3, 2)
