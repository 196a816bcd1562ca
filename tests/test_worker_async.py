"""The worker side of an ASYNC step (issue 7): the handler sends the item to its provider with the
callback URL of this attempt, returns ``Submitted``, and the row awaits its callback with no worker
holding it."""

from __future__ import annotations

import asyncio
import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from uuid import uuid4

import psycopg
import pytest
from click.testing import CliRunner
from rich.console import Console

from shared.cli.main import main
from shared.cli.progress import RateMeter, columns, plain_line, render
from shared.pg_state import PgStateAPI
from shared.settings import get_settings
from shared.state_api import BatchProgress, StepResult, StepSubmission, TaskRef
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


def test_the_progress_table_shows_awaiting_rows_apart() -> None:
    counts = {"PENDING": 1, "QUEUED": 0, "IN_PROGRESS": 5, "COMPLETED": 2, "FAILED": 0}
    progress = BatchProgress(
        uuid4(), None, "IN_PROGRESS", 8, False, {"later": counts}, awaiting={"later": 3}
    )
    assert columns(progress) == [
        "PENDING",
        "QUEUED",
        "IN_PROGRESS",
        "AWAITING",
        "COMPLETED",
        "FAILED",
    ]
    console = Console(width=200, record=True)
    console.print(render(progress, RateMeter(), 1.0))
    row = next(line for line in console.export_text().splitlines() if line.startswith("later"))
    assert row.split()[1:7] == ["1", "0", "2", "3", "2", "0"]
    assert "3 awaiting callback" in plain_line(progress, RateMeter(), 1.0)
    quiet = BatchProgress(uuid4(), None, "IN_PROGRESS", 8, False, {"later": counts})
    assert "AWAITING" not in columns(quiet)


async def test_export_says_awaiting_callback(
    dsn: str, api: PgStateAPI, conn: Conn, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    await register_async_step(conn, "later")
    batch_id = await api.create_batch(["later"], [company(0), company(1)])
    submitted, running = [c.task for c in await api.claim(10, batch_ids=[batch_id])]
    await api.start([submitted, running])
    await api.submit([StepSubmission(submitted, "req")])
    monkeypatch.setenv("DATABASE_URL", dsn)
    get_settings.cache_clear()
    out = tmp_path / "out.csv"
    try:
        result = await asyncio.to_thread(
            CliRunner().invoke, main, ["export", str(batch_id), "-o", str(out)]
        )
    finally:
        monkeypatch.delenv("DATABASE_URL")
        get_settings.cache_clear()

    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["later: status"] for r in rows) == ["awaiting callback", "running"]
