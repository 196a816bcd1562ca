"""conduct_until_idle: one conductor run hands on rows that become ready while it lingers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from shared.conductor import conduct_until_idle
from shared.pg_state import PgStateAPI
from shared.state_api import ClaimedTask, StepResult


class Recording:
    def __init__(self) -> None:
        self.sent: list[ClaimedTask] = []

    def capacity(self) -> int | None:
        return None

    async def dispatch(self, function_name: str, claimed: Sequence[ClaimedTask]) -> None:
        self.sent.extend(claimed)


async def test_rows_ready_during_the_linger_are_claimed_by_the_same_run(dsn: str) -> None:
    async with await PgStateAPI.open(dsn) as api, await PgStateAPI.open(dsn) as worker:
        batch_id = await api.create_batch(["step_a", "step_b"], [{"n": i} for i in range(5)])
        dispatcher = Recording()

        async def finish_step_a_later() -> None:
            # A worker finishing the first wave while the conductor run lingers.
            deadline = time.monotonic() + 10
            while len(dispatcher.sent) < 5:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            started = await worker.start([c.task for c in dispatcher.sent])
            await worker.complete([StepResult(s.task, {}) for s in started])

        run = asyncio.create_task(
            conduct_until_idle(api, dispatcher, linger_seconds=1.5, poll_seconds=0.05)
        )
        await finish_step_a_later()
        report = await run

    assert report.claimed == 10
    assert [c.task.step_name for c in dispatcher.sent] == ["step_a"] * 5 + ["step_b"] * 5
    assert {c.task.batch_id for c in dispatcher.sent} == {batch_id}


async def test_an_idle_run_exits_after_the_linger(dsn: str) -> None:
    async with await PgStateAPI.open(dsn) as api:
        began = time.monotonic()
        report = await conduct_until_idle(api, Recording(), linger_seconds=0.3, poll_seconds=0.05)
        took = time.monotonic() - began

    assert report.claimed == 0
    assert 0.3 <= took < 5


async def test_max_rows_bounds_a_lingering_run(dsn: str) -> None:
    async with await PgStateAPI.open(dsn) as api:
        await api.create_batch(["step_a"], [{"n": i} for i in range(30)])
        dispatcher = Recording()
        report = await conduct_until_idle(
            api, dispatcher, linger_seconds=30, claim_limit=7, max_rows=12
        )

    assert report.claimed == 12 and len(dispatcher.sent) == 12
