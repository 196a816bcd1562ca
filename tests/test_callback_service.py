"""The callback receiver as a service of its own (``shared.callbacks.service``): what the Modal web
endpoint serves and what ``enrich dev up`` runs. A real process on a real port, against the test
database, with workers signing in another process, as on Modal."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from pydantic import SecretStr

from modal_app.entry import run_function_chunk
from shared.callbacks.service import create_callback_service
from shared.callbacks.token import callback_urls, load_keys
from shared.cli.dev_commands import free_port
from shared.errors import ConfigurationError
from shared.pg_state import PgStateAPI
from shared.settings import Settings, get_settings
from shared.state_api import StepSubmission
from tests.conftest import wait_for
from tests.contract import claim_and_start, company, state

REPO = Path(__file__).resolve().parents[1]
SECRET = "s" * 40


class Service:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def service(dsn: str, tmp_path: Path) -> Iterator[Service]:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "ENRICH_HOME": str(tmp_path),
        "ENRICH_CALLBACK_SECRET": SECRET,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.callbacks.service", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: healthy(url) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, proc.communicate()[0]
        yield Service(proc, url)
    finally:
        proc.terminate()
        proc.wait(timeout=15)


@pytest.fixture
def secret_in_env(monkeypatch: pytest.MonkeyPatch, dsn: str) -> Iterator[None]:
    monkeypatch.setenv("ENRICH_CALLBACK_SECRET", SECRET)
    monkeypatch.setenv("DATABASE_URL", dsn)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


async def test_the_service_applies_callbacks_signed_in_another_process(
    service: Service, api: PgStateAPI, conn: psycopg.AsyncConnection[Any], tmp_path: Path
) -> None:
    batch_id = await api.create_batch(["step_async"], [company(1)])
    [task] = await claim_and_start(api, batch_id)
    assert all(s.ok for s in await api.submit([StepSubmission(task, "req-1")]))
    keys = load_keys(Settings(enrich_home=tmp_path, callback_secret=SecretStr(SECRET)))
    url = callback_urls(service.url, keys)(task)
    async with httpx.AsyncClient() as client:
        first = await client.post(url, json={"answer": 42})
        replay = await client.post(url, json={"answer": 43})
        forged = await client.post(url[:-4] + "AAAA", json={"answer": 44})
    assert (first.status_code, first.json()) == (200, {"status": "applied"})
    assert (replay.status_code, replay.json()) == (200, {"status": "already applied"})
    assert forged.status_code == 401
    row = await state(conn, task)
    assert row["status"] == "COMPLETED"
    cur = await conn.execute(
        "select result from step_async_results where item_id = %s", (task.item_id,)
    )
    assert [r[0] for r in await cur.fetchall()] == [{"answer": 42}]


async def test_modal_worker_path_hands_providers_urls_of_the_service(
    service: Service, api: PgStateAPI, conn: psycopg.AsyncConnection[Any], secret_in_env: None
) -> None:
    # What an ASYNC Modal function runs: sign with the key from the environment, the receiver's
    # URL as base; the emulator (the provider) answers the service in the other process.
    batch_id = await api.create_batch(["step_async"], [company(i) for i in range(5)])
    tasks = await claim_and_start(api, batch_id)
    report = await run_function_chunk(
        "step_async",
        [t.to_json() for t in tasks],
        callback_base_url=service.url,
        key_from_environment=True,
    )
    assert report["submitted"] == 5

    async def completed() -> int:
        cur = await conn.execute(
            "select count(*) from workflow_states where batch_id = %s and status = 'COMPLETED'",
            (batch_id,),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    deadline = asyncio.get_running_loop().time() + 20
    while await completed() < 5:
        assert asyncio.get_running_loop().time() < deadline, "callbacks not applied in 20 s"
        await asyncio.sleep(0.05)


def test_without_a_configured_key_the_service_and_modal_workers_refuse(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A key file would be a different random key in each Modal container: every callback would
    # be refused as forged. Refused at start-up instead, naming the variable.
    monkeypatch.delenv("ENRICH_CALLBACK_SECRET", raising=False)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match="ENRICH_CALLBACK_SECRET is not set"):
            create_callback_service()
        with pytest.raises(ConfigurationError, match="ENRICH_CALLBACK_SECRET is not set"):
            asyncio.run(
                run_function_chunk(
                    "step_async", [], callback_base_url="https://x", key_from_environment=True
                )
            )
    finally:
        get_settings.cache_clear()
