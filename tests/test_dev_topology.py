"""``enrich dev up``: the production topology on one machine, end to end, plus its small parts.

The slow test starts the real thing as a user would (``enrich dev up`` in a subprocess, one Prefect
server), inserts a batch with plain SQL as Supabase Studio does, and checks that it completes
through flow runs of the conductor deployment that its event trigger started, then ``enrich dev
down``. The other tests cover the relay's coalescing and the local worker service's refusals
without any server.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import psycopg
import pytest

from flows import conductor as conductor_module
from flows import dev_serve, dispatchers, relay
from modal_app import local_service
from modal_app.local_service import create_app
from shared.cli import dev_commands
from shared.cli.dev_commands import process_alive
from shared.errors import ConfigurationError
from shared.settings import Settings, get_settings

from .conftest import make_short_home, remove_home

UP_TIMEOUT_S = 240.0
BATCH_DEADLINE_S = 90.0
RUN_DEADLINE_S = 30.0
ITEMS = 40


# The parts agree on their shared names (shared/ may not import flows/ or modal_app/) ------------


def test_the_cli_and_the_flows_agree_on_names() -> None:
    assert dev_commands.LOCAL_WORKERS_URL_ENV == dispatchers.LOCAL_WORKERS_URL_ENV
    assert dev_commands.LOCAL_WORKERS_TOKEN_ENV == dispatchers.LOCAL_WORKERS_TOKEN_ENV
    assert dev_commands.LOCAL_WORKERS_TOKEN_ENV == local_service.TOKEN_ENV
    field = Settings.model_fields["callback_base_url"]
    assert dev_commands.CALLBACK_BASE_URL_ENV in str(field.validation_alias)
    assert conductor_module.conductor.name == dev_commands.FLOW_NAME
    assert dev_commands.DEPLOYMENT_NAME == dev_serve.DEPLOYMENT_NAME
    assert relay.EVENT_NAME == dev_serve.EVENT_NAME
    assert relay.RESOURCE_PREFIX == dev_serve.RESOURCE_PREFIX


# The relay: bursts coalesced, the trailing edge kept ----------------------------------------------


def test_merge_payloads_keeps_a_single_payload_and_sums_a_burst() -> None:
    one = {"op": "INSERT", "batch_ids": ["a"], "more_batches": False, "ready": 3, "finished": 0}
    assert relay.merge_payloads([one]) == {**one, "notifications": 1}
    merged = relay.merge_payloads(
        [
            one,
            {"op": "UPDATE", "batch_ids": ["b", "a"], "ready": 0, "finished": 5},
            relay.parse_payload("not json"),
        ]
    )
    assert merged == {
        "op": "UPDATE",
        "batch_ids": ["a", "b"],
        "more_batches": True,  # an unreadable payload may name any batch
        "ready": 3,
        "finished": 5,
        "notifications": 3,
    }


async def test_coalescer_sends_the_leading_edge_at_once_and_one_trailing_event() -> None:
    sent: list[tuple[float, dict[str, Any]]] = []
    began = time.monotonic()

    async def emit(payload: dict[str, Any]) -> None:
        sent.append((time.monotonic() - began, payload))

    coalescer = relay.Coalescer(0.3, emit)
    runner = asyncio.create_task(coalescer.run())
    try:
        coalescer.add({"ready": 1})
        await asyncio.sleep(0.05)
        assert [p["ready"] for _, p in sent] == [1]  # leading edge: no waiting
        for n in range(2, 12):
            coalescer.add({"ready": n})
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        assert len(sent) == 2  # the burst of ten became one event
        at, trailing = sent[1]
        assert trailing["notifications"] == 10 and trailing["ready"] == sum(range(2, 12))
        assert at >= 0.3  # not before the window closed
        coalescer.add({"ready": 99})
        await asyncio.sleep(0.05)
        assert len(sent) == 3 and sent[2][1]["ready"] == 99  # quiet again: at once
    finally:
        runner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await runner


# The local stand-in for Modal refuses what Modal would -------------------------------------------


TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def test_local_service_refuses_unknown_functions_and_bad_tasks() -> None:
    transport = httpx.ASGITransport(app=create_app(["step_a"], token=TOKEN))
    async with httpx.AsyncClient(
        transport=transport, base_url="http://local", headers=AUTH
    ) as client:
        assert (await client.get("/health")).json()["functions"] == ["step_a"]
        assert (await client.post("/functions/nope/spawn", json=[])).status_code == 404
        wrapped = await client.post("/functions/step_a/spawn", json={"tasks": []})
        assert wrapped.status_code == 422
        bad = await client.post("/functions/step_a/spawn", json=[{"batch_id": "x"}])
        assert bad.status_code == 422
        assert (await client.get("/calls/local-unknown")).status_code == 404


def a_task(step: str) -> dict[str, Any]:
    return {
        "batch_id": "00000000-0000-4000-8000-000000000001",
        "item_id": "00000000-0000-4000-8000-000000000002",
        "step_name": step,
        "attempt": 1,
    }


async def test_local_service_needs_the_token_and_json() -> None:
    app = create_app(["step_a"], token=TOKEN)
    body = json.dumps([a_task("step_a")])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://local") as client:
        url = "/functions/step_a/spawn"
        json_type = {"Content-Type": "application/json"}
        # What any web page can send: a simple cross-origin request, no credentials.
        page = await client.post(url, content=body, headers={"Content-Type": "text/plain"})
        assert page.status_code == 401
        assert (await client.post(url, content=body, headers=json_type)).status_code == 401
        wrong = {**json_type, "Authorization": "Bearer not-the-token"}
        assert (await client.post(url, content=body, headers=wrong)).status_code == 401
        # The token, but not JSON: refused too (a page could only send it after a preflight).
        plain = {"Content-Type": "text/plain", **AUTH}
        assert (await client.post(url, content=body, headers=plain)).status_code == 415
        assert (await client.get("/calls/local-unknown")).status_code == 401
        assert (await client.get("/health")).status_code == 200
    assert app.state.pool.calls == {}  # nothing was started


async def test_local_service_runs_only_the_steps_of_the_function_called(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", dsn)
    get_settings.cache_clear()
    with psycopg.connect(dsn, autocommit=True) as conn:
        # A second step served by the same function: the registry decides, not the names.
        conn.execute(
            "insert into enrichment_registry (step_name, modal_function_name, results_table)"
            " values ('step_a_too', 'step_a', null)"
        )
    app = create_app(["step_a", "step_b"], token=TOKEN)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://local", headers=AUTH
        ) as client:
            url = "/functions/step_a/spawn"
            other = await client.post(url, json=[a_task("step_a"), a_task("step_b")])
            assert other.status_code == 422
            assert "step_b" in other.json()["error"]
            unknown = await client.post(url, json=[a_task("no_such_step")])
            assert unknown.status_code == 422
            assert app.state.pool.calls == {}
            ok = await client.post(url, json=[a_task("step_a"), a_task("step_a_too")])
            assert ok.status_code == 200, ok.text
            assert list(app.state.pool.calls) == [ok.json()["object_id"]]
    finally:
        await app.state.pool.stop()
        get_settings.cache_clear()


def test_local_dispatch_needs_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatchers.LOCAL_WORKERS_TOKEN_ENV, raising=False)
    with pytest.raises(ConfigurationError, match=dispatchers.LOCAL_WORKERS_TOKEN_ENV):
        dispatchers.local_function_lookup("http://127.0.0.1:1")


# Files under dev/ are the user's own ------------------------------------------------------------


def test_dev_files_are_private(tmp_path: Path) -> None:
    layout = dev_commands.Layout(tmp_path)
    layout.dir.mkdir(mode=0o755)
    layout.dir.chmod(0o755)
    old_log = layout.log_file("workers")
    old_log.write_text("left world-readable by an earlier version\n")
    old_log.chmod(0o644)
    proc = dev_commands.start_process(
        layout, "workers", [sys.executable, "-c", "print('hello')"], dict(os.environ)
    )
    assert proc.wait(timeout=60) == 0
    state = dev_commands.DevState(workers_token="secret")
    state.save(layout)

    def mode(path: Path) -> int:
        return path.stat().st_mode & 0o777

    assert mode(layout.dir) == 0o700
    assert mode(layout.log_file("workers")) == 0o600
    assert mode(layout.pid_file("workers")) == 0o600
    assert mode(layout.state_file) == 0o600
    assert "hello" in layout.log_file("workers").read_text()
    assert dev_commands.DevState.load(layout).workers_token == "secret"


# The whole topology ------------------------------------------------------------------------------


def enrich(
    args: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def key_values(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


@pytest.fixture
def dev_env(dsn: str) -> Iterator[dict[str, str]]:
    """A short ENRICH_HOME of its own and DATABASE_URL = this test's database; whatever is left
    running at the end is stopped."""
    home = make_short_home("dev")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MODAL_"))}
    env.update(ENRICH_HOME=str(home), DATABASE_URL=dsn)
    try:
        yield env
    finally:
        enrich(["dev", "down", "--timeout", "5"], env, timeout=120)
        remove_home(home)


async def conductor_flow_runs(api_url: str) -> tuple[Any, list[Any], list[Any]]:
    """The deployment, its flow runs and the automations of its triggers, read from the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        async with get_client() as client:
            deployment = await client.read_deployment_by_name(
                f"{dev_commands.FLOW_NAME}/{dev_commands.DEPLOYMENT_NAME}"
            )
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id]))
            )
            automations = await client.read_resource_related_automations(
                f"prefect.deployment.{deployment.id}"
            )
    return deployment, runs, automations


@pytest.mark.slow
def test_dev_up_runs_a_studio_batch_through_event_triggered_flow_runs(
    dsn: str, dev_env: dict[str, str]
) -> None:
    began = time.monotonic()
    up = enrich(["dev", "up", "--no-ui"], dev_env, timeout=UP_TIMEOUT_S)
    assert up.returncode == 0, f"stdout:\n{up.stdout}\nstderr:\n{up.stderr}"
    urls = key_values(up.stdout)
    api_url = urls["PREFECT_API_URL"]
    assert api_url.startswith("http://127.0.0.1:") and api_url.endswith("/api")
    assert urls["ENRICH_LOCAL_WORKERS_URL"].startswith("http://127.0.0.1:")
    assert urls["ENRICH_CALLBACK_BASE_URL"].startswith("http://127.0.0.1:")
    up_seconds = time.monotonic() - began

    status = enrich(["dev", "status", "--json"], dev_env, timeout=60)
    assert status.returncode == 0, status.stderr
    parts = {p["part"]: p for p in json.loads(status.stdout)["parts"]}
    assert set(parts) == {"callbacks", "workers", "prefect", "conductor", "relay"}
    assert all(p["alive"] for p in parts.values()), parts
    pids = {name: int(p["pid"]) for name, p in parts.items()}

    # Idempotent: a second `up` leaves every part running as it is.
    again = enrich(["dev", "up", "--no-ui"], dev_env, timeout=UP_TIMEOUT_S)
    assert again.returncode == 0, again.stderr
    assert key_values(again.stdout)["PREFECT_API_URL"] == api_url
    assert again.stderr.count("already running") == 5, again.stderr

    # A batch inserted with plain SQL, as Supabase Studio does; its ASYNC step is answered by the
    # emulator on the dev receiver.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "update enrichment_registry set config = config || '{\"sleep_ms\": 0}'::jsonb "
            "where step_name = 'step_a'"
        )
        row = conn.execute(
            'insert into batches (blueprint) values (\'["step_a", "step_async"]\'::jsonb)'
            " returning id"
        ).fetchone()
        assert row is not None
        batch_id: UUID = row[0]
        conn.execute(
            "insert into batch_items (batch_id, raw_data) "
            "select %s, jsonb_build_object('n', g) from generate_series(1, %s) g",
            (batch_id, ITEMS),
        )
        inserted = time.monotonic()
        deadline = inserted + BATCH_DEADLINE_S
        while True:
            found = conn.execute("select status::text from batches where id = %s", (batch_id,))
            batch_status = found.fetchone()
            if batch_status is not None and batch_status[0] == "COMPLETED":
                break
            assert time.monotonic() < deadline, f"batch still {batch_status} after the deadline"
            time.sleep(0.25)
        batch_seconds = time.monotonic() - inserted
        calls = conn.execute(
            "select meta -> 'dispatch' ->> 'call_id' from workflow_states where batch_id = %s",
            (batch_id,),
        ).fetchall()
    assert len(calls) == 2 * ITEMS
    assert all(c[0] and c[0].startswith("local-") for c in calls), calls  # via the local workers

    # The runs that did it were started by the deployment's event trigger (an automation), not by
    # its schedule; the one that dispatched may still be finishing when the batch is done.
    deadline = time.monotonic() + RUN_DEADLINE_S
    while True:
        deployment, runs, automations = asyncio.run(conductor_flow_runs(api_url))
        by_trigger = [
            r for r in runs if r.created_by is not None and r.created_by.type == "AUTOMATION"
        ]
        # The one-minute safety sweep: the server's scheduler creates its runs ahead of time
        # (SQLAlchemy 2.1 broke exactly this in the Prefect 3.8 server: hence the pin).
        scheduled = [r for r in runs if r.auto_scheduled]
        if scheduled and any(r.state is not None and r.state.is_completed() for r in by_trigger):
            break
        assert time.monotonic() < deadline, [(r.name, r.created_by, r.state) for r in runs]
        time.sleep(0.5)
    assert deployment.parameters == {"dispatcher": "local"}
    assert [s.schedule.interval.total_seconds() for s in deployment.schedules] == [60.0]
    assert [a.trigger.expect for a in automations] == [{"enrichment.state.changed"}]
    assert {r.created_by.id for r in by_trigger} <= {a.id for a in automations}

    down_began = time.monotonic()
    down = enrich(["dev", "down"], dev_env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert all(not process_alive(pid) for pid in pids.values()), pids
    after = enrich(["dev", "status", "--json"], dev_env, timeout=60)
    assert not any(p["alive"] for p in json.loads(after.stdout)["parts"])
    print(
        f"dev up {up_seconds:.1f}s, batch of {ITEMS} completed {batch_seconds:.1f}s after the "
        f"insert, dev down {time.monotonic() - down_began:.1f}s, "
        f"{len(by_trigger)} event-triggered run(s)"
    )


def test_dev_down_with_nothing_started_is_a_no_op(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["DATABASE_URL"] = "postgresql://nobody@127.0.0.1:1/none"
    result = enrich(["dev", "down", "--home", str(tmp_path)], env, timeout=60)
    assert result.returncode == 0, result.stderr
    status = enrich(["dev", "status", "--home", str(tmp_path), "--json"], env, timeout=60)
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["database"]["kind"] == "external"
    assert not any(p["alive"] for p in doc["parts"])
