"""The worker side of an ASYNC step (issue 7): the handler sends the item to its provider with the
callback URL of this attempt, returns ``Submitted``, and the row awaits its callback with no worker
holding it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import psycopg

from shared.pg_state import PgStateAPI
from shared.state_api import StepResult, TaskRef
from shared.steps import StepContext, Submitted
from shared.worker import run_chunk
from tests.contract import company, states
from tests.contract.test_async import register_async_step

Conn = psycopg.AsyncConnection[tuple[object, ...]]


async def test_an_async_handler_submits_and_the_row_awaits_its_callback(
    api: PgStateAPI, conn: Conn
) -> None:
    await register_async_step(conn, "later", callback_timeout_seconds=600)
    batch_id = await api.create_batch(["later"], [company(i) for i in range(3)])
    claimed = [c.task for c in await api.claim(10, batch_ids=[batch_id])]
    sent: dict[str, str | None] = {}

    async def handler(raw: Mapping[str, Any], ctx: StepContext) -> Submitted:
        sent[raw["name"]] = ctx.callback_url
        return Submitted(request_id=f"req-{raw['name']}")

    def url(task: TaskRef) -> str:
        return f"http://127.0.0.1:8787/callbacks/{task.item_id}-{task.attempt}"

    report = await run_chunk(api, "later", claimed, handlers={"later": handler}, callback_url=url)

    assert (report.submitted, report.completed, report.refused) == (3, 0, 0)
    rows = await states(conn, batch_id)
    assert {r["status"] for r in rows} == {"IN_PROGRESS"}
    assert {r["meta"]["awaiting"]["request_id"] for r in rows} == {
        f"req-Company {i} Inc" for i in range(3)
    }
    assert sorted(u for u in sent.values() if u) == sorted(url(t) for t in claimed)
    # The callback then completes the row through the ordinary transition.
    done = await api.complete([StepResult(t, {"ok": True}) for t in claimed])
    assert all(o.ok for o in done)
