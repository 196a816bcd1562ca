"""The Prefect conductor flow, run for real against a temporary Prefect server and the test
database, with a recording dispatcher in place of Modal.

Prefect's temporary server takes 15-30 s to start on this machine (DESIGN.md): it is started once
per session, with a generous startup timeout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any, cast
from uuid import UUID

import pytest
from prefect.testing.utilities import prefect_test_harness

import flows.conductor
from flows.dispatchers import ModalDispatcher
from shared.pg_state import PgStateAPI
from shared.settings import get_settings
from shared.state_api import ClaimedTask, StateAPI

from .contract import Conn, company, fetch

STARTUP_TIMEOUT = 120


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[None]:
    previous = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = str(STARTUP_TIMEOUT)
    try:
        with prefect_test_harness(server_startup_timeout=STARTUP_TIMEOUT):
            yield
    finally:
        if previous is None:
            os.environ.pop("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", None)
        else:
            os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = previous


class RecordingDispatcher:
    """Takes every row and remembers it; sends nothing anywhere."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, ClaimedTask]] = []
        self.kinds: list[str] = []

    def capacity(self) -> int | None:
        return None

    async def dispatch(self, function_name: str, claimed: Sequence[ClaimedTask]) -> None:
        self.sent.extend((function_name, c) for c in claimed)


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch, dsn: str) -> Iterator[RecordingDispatcher]:
    """The flow's database is the test database, and its dispatcher records."""
    dispatcher = RecordingDispatcher()

    def make_dispatcher(kind: str, api: StateAPI) -> RecordingDispatcher:
        dispatcher.kinds.append(kind)
        return dispatcher

    monkeypatch.setattr(flows.conductor, "make_dispatcher", make_dispatcher)
    monkeypatch.setenv("DATABASE_URL", dsn)
    get_settings.cache_clear()
    yield dispatcher
    get_settings.cache_clear()


async def create_batches(dsn: str) -> tuple[UUID, UUID]:
    async with await PgStateAPI.open(dsn, max_size=1) as api:
        first = await api.create_batch(["step_a"], [company(i) for i in range(120)])
        second = await api.create_batch(["step_b"], [company(i) for i in range(30)])
    return first, second


async def status_counts(conn: Conn) -> dict[tuple[UUID, str, str, int], int]:
    rows = await fetch(
        conn,
        "select batch_id, step_name, status::text as status, attempt, count(*) as n"
        " from workflow_states group by 1, 2, 3, 4",
    )
    return {(r["batch_id"], r["step_name"], r["status"], r["attempt"]): r["n"] for r in rows}


async def test_the_flow_claims_every_ready_row_and_returns_its_report(
    prefect_server: None, recording: RecordingDispatcher, dsn: str, conn: Conn
) -> None:
    first, second = await create_batches(dsn)

    report: dict[str, Any] = await flows.conductor.conductor(claim_limit=50, linger_seconds=0)

    assert report == {
        "swept": 0,
        "claimed": 150,
        "dispatched": 150,
        "dispatch_failures": 0,
        "by_function": {"step_a": 120, "step_b": 30},
    }
    assert recording.kinds == ["modal"]
    assert await status_counts(conn) == {
        (first, "step_a", "QUEUED", 1): 120,
        (second, "step_b", "QUEUED", 1): 30,
    }
    rows = await fetch(conn, "select batch_id, item_id, step_name, attempt from workflow_states")
    assert sorted(
        (c.task.batch_id, c.task.item_id, c.task.step_name, c.task.attempt)
        for _, c in recording.sent
    ) == sorted((r["batch_id"], r["item_id"], r["step_name"], r["attempt"]) for r in rows)
    assert {(name, c.task.step_name) for name, c in recording.sent} == {
        ("step_a", "step_a"),
        ("step_b", "step_b"),
    }


async def test_the_flow_honours_batch_ids_and_max_rows(
    prefect_server: None, recording: RecordingDispatcher, dsn: str, conn: Conn
) -> None:
    first, second = await create_batches(dsn)

    report = await flows.conductor.conductor(
        batch_ids=[str(first)], claim_limit=30, max_rows=70, linger_seconds=0
    )

    assert (report["claimed"], report["dispatched"]) == (70, 70)
    assert await status_counts(conn) == {
        (first, "step_a", "QUEUED", 1): 70,
        (first, "step_a", "PENDING", 0): 50,
        (second, "step_b", "PENDING", 0): 30,
    }
    assert {c.task.batch_id for _, c in recording.sent} == {first}


async def test_make_dispatcher_builds_the_modal_dispatcher_without_credentials(
    monkeypatch: pytest.MonkeyPatch, dsn: str
) -> None:
    for name in list(os.environ):
        if name.startswith("MODAL_TOKEN"):
            monkeypatch.delenv(name)
    async with await PgStateAPI.open(dsn, max_size=1) as api:
        assert isinstance(flows.conductor.make_dispatcher("modal", api), ModalDispatcher)
        with pytest.raises(ValueError, match="unknown dispatcher 'carrier_pigeon'"):
            flows.conductor.make_dispatcher("carrier_pigeon", api)


async def test_the_modal_dispatcher_looks_functions_up_in_the_configured_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not the profile's default: the environment deploy.sh deployed the app to (MODAL_ENVIRONMENT,
    passed to the deployment's job variables)."""
    import modal

    looked_up: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def from_name(*args: Any, **kwargs: Any) -> object:
        looked_up.append((args, kwargs))
        return object()

    monkeypatch.setattr(modal.Function, "from_name", from_name)
    monkeypatch.setenv("MODAL_ENVIRONMENT", "staging")
    monkeypatch.setenv("ENRICH_MODAL_APP", "enrichment-workers-staging")
    get_settings.cache_clear()
    try:
        dispatcher = flows.conductor.make_dispatcher("modal", cast(StateAPI, object()))
        await dispatcher.dispatch("step_a", [])  # looks the function up, spawns nothing
    finally:
        get_settings.cache_clear()
    assert looked_up == [
        (("enrichment-workers-staging", "step_a"), {"environment_name": "staging"})
    ]
