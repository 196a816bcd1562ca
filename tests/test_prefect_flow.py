"""The Prefect conductor flow, run for real against a temporary Prefect server and the test
database, with a recording dispatcher in place of Modal.

Prefect's temporary server takes 15-30 s to start on this machine (DESIGN.md): it is started once
per session, with a generous startup timeout.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from typing import Any, cast
from uuid import UUID

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
from prefect.client.schemas.objects import Artifact
from prefect.testing.utilities import prefect_test_harness

import flows.conductor
import flows.progress_artifacts
from flows.dispatchers import ModalDispatcher
from flows.progress_artifacts import BatchArtifacts
from shared.pg_state import PgStateAPI
from shared.settings import get_settings
from shared.state_api import BatchProgress, ClaimedTask, StateAPI, StepFailure, StepResult

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


# Progress artifacts (flows/progress_artifacts.py) ------------------------------------------------


async def artifacts_with_key(key: str) -> list[Artifact]:
    async with get_client() as client:
        return await client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )


def table_of(artifact: Artifact) -> Any:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


async def finish_some(dsn: str, batch_id: UUID, completed: int, failed: int) -> None:
    """Run ``completed + failed`` rows of the batch to COMPLETED or (terminally) FAILED."""
    async with await PgStateAPI.open(dsn, max_size=1) as api:
        claimed = [c.task for c in await api.claim(completed + failed, batch_ids=[batch_id])]
        await api.start(claimed)
        await api.complete([StepResult(t, {}) for t in claimed[:completed]])
        await api.fail([StepFailure(t, "bad row", retryable=False) for t in claimed[completed:]])


async def test_the_flow_publishes_each_batchs_progress_as_artifacts(
    prefect_server: None, recording: RecordingDispatcher, dsn: str
) -> None:
    first, second = await create_batches(dsn)
    await finish_some(dsn, first, completed=20, failed=10)

    state = await flows.conductor.conductor(linger_seconds=0, return_state=True)
    assert state.is_completed()

    [table] = await artifacts_with_key(f"batch-{first}")
    [bar] = await artifacts_with_key(f"batch-{first}-progress")
    assert table.flow_run_id == bar.flow_run_id == state.state_details.flow_run_id
    assert (table.type, bar.type) == ("table", "progress")
    assert table_of(table) == [
        {
            "step": "step_a",
            "pending": 0,
            "queued": 90,
            "running": 0,
            "awaiting_callback": 0,
            "completed": 20,
            "skipped": 0,
            "cached": 0,
            "failed": 10,
        }
    ]
    assert table.description is not None
    assert "items finished: 30 of 120 (25.0%)" in table.description
    assert "failures by step: step_a 10" in table.description
    assert bar.data == 25.0
    [other] = await artifacts_with_key(f"batch-{second}")
    assert table_of(other)[0]["queued"] == 30


async def test_artifacts_update_in_place_at_most_every_few_seconds(
    prefect_server: None, dsn: str
) -> None:
    first, _ = await create_batches(dsn)
    now = [1000.0]

    @flow
    async def watch_a_batch() -> list[int]:
        published = []
        async with await PgStateAPI.open(dsn, max_size=1) as api:
            artifacts = BatchArtifacts(api, every_seconds=5, clock=lambda: now[0])
            artifacts.watch([first])
            published.append(await artifacts.publish())
            await finish_some(dsn, first, completed=12, failed=0)
            now[0] += 1
            published.append(await artifacts.publish())  # too soon: nothing sent
            [table] = await artifacts_with_key(f"batch-{first}")
            assert table_of(table)[0]["completed"] == 0
            now[0] += 5
            published.append(await artifacts.publish())
            published.append(await artifacts.publish(force=True))  # nothing changed
        return published

    assert await watch_a_batch() == [1, 0, 1, 0]
    [table] = await artifacts_with_key(f"batch-{first}")  # updated, not a new version
    [bar] = await artifacts_with_key(f"batch-{first}-progress")
    assert (table_of(table)[0]["completed"], bar.data) == (12, 10.0)
    assert table.description is not None
    # 12 item-steps finished in the 6 s between the first publication and this one.
    assert "rate in this run: 2.0 item-steps/s" in table.description


async def test_an_artifact_api_failure_never_fails_the_flow(
    prefect_server: None,
    recording: RecordingDispatcher,
    dsn: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, _ = await create_batches(dsn)

    async def refuse(**kwargs: Any) -> UUID:
        raise RuntimeError("Prefect API unreachable")

    monkeypatch.setattr(flows.progress_artifacts, "acreate_table_artifact", refuse)

    report = await flows.conductor.conductor(linger_seconds=0)

    assert report["claimed"] == 150
    assert await artifacts_with_key(f"batch-{first}") == []
    assert f"progress artifact for batch {first} not published: Prefect API unreachable" in (
        caplog.text
    )


async def test_slow_progress_reads_are_published_less_often(
    prefect_server: None, dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A publication that took 3 s (a huge batch's counts) is followed by none for 30 s."""
    first, _ = await create_batches(dsn)
    now = [0.0]

    @flow
    async def watch_a_slow_batch() -> list[int]:
        async with await PgStateAPI.open(dsn, max_size=1) as api:
            read_progress = api.batch_progress

            async def slowly(batch_id: UUID) -> BatchProgress:
                now[0] += 3
                return await read_progress(batch_id)

            monkeypatch.setattr(api, "batch_progress", slowly)
            artifacts = BatchArtifacts(api, every_seconds=5, clock=lambda: now[0])
            artifacts.watch([first])
            published = [await artifacts.publish()]  # from 0 s to 3 s
            await finish_some(dsn, first, completed=6, failed=0)
            now[0] = 10
            published.append(await artifacts.publish())  # within 10 x 3 s of the last
            now[0] = 31
            published.append(await artifacts.publish())
        return published

    assert await watch_a_slow_batch() == [1, 0, 1]
