"""``ModalDispatcher`` with Modal replaced by a fake lookup, and the Modal functions' body
(``modal_app.entry.run_function_chunk``) run here against the test database.

No Modal credentials are ever set: ``modal.Function.from_name`` is only constructed (lazy), never
called.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, cast
from uuid import UUID

import modal
import pytest

from flows.dispatchers import ModalDispatcher, SpawnMethod, modal_function_lookup
from modal_app.entry import run_function_chunk
from shared.conductor import conduct
from shared.pg_state import PgStateAPI
from shared.settings import get_settings

from .contract import Conn, company, fetch, make_ready

ITEMS = 250
CHUNK = 100


@dataclass
class FakeCall:
    object_id: str


@dataclass
class SpawnRecord:
    function_name: str
    tasks: list[dict[str, Any]]
    call_id: str | None  # None: this spawn raised


@dataclass
class FakeModal:
    """What ``modal_function_lookup`` returns, without Modal: records every spawn, and makes spawn
    number ``fail_on`` (1-based) raise."""

    fail_on: int | None = None
    spawns: list[SpawnRecord] = field(default_factory=list)
    looked_up: list[str] = field(default_factory=list)

    def lookup(self, function_name: str) -> FakeFunction:
        self.looked_up.append(function_name)
        return FakeFunction(self, function_name)


class FakeSpawn:
    def __init__(self, modal_fake: FakeModal, function_name: str) -> None:
        self._modal = modal_fake
        self._function_name = function_name

    async def aio(self, *args: Any, **kwargs: Any) -> FakeCall:
        assert not kwargs, kwargs
        assert len(args) == 1, args
        number = len(self._modal.spawns) + 1
        call_id = None if number == self._modal.fail_on else f"fc-{number:04d}"
        self._modal.spawns.append(SpawnRecord(self._function_name, list(args[0]), call_id))
        if call_id is None:
            raise RuntimeError("modal is down")
        return FakeCall(call_id)


class FakeFunction:
    def __init__(self, modal_fake: FakeModal, function_name: str) -> None:
        self.spawn: SpawnMethod = FakeSpawn(modal_fake, function_name)


@pytest.fixture
async def api(dsn: str) -> AsyncIterator[PgStateAPI]:
    async with await PgStateAPI.open(dsn, max_size=4) as state_api:
        yield state_api


@pytest.fixture
def database_url(dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """DATABASE_URL for code that opens the State API itself (open_state_api)."""
    monkeypatch.setenv("DATABASE_URL", dsn)
    get_settings.cache_clear()
    yield dsn
    get_settings.cache_clear()


@pytest.fixture(autouse=True)
def no_modal_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("MODAL_TOKEN"):
            monkeypatch.delenv(name)


async def workflow_rows(conn: Conn, batch_id: UUID) -> dict[UUID, dict[str, Any]]:
    rows = await fetch(
        conn,
        "select item_id, step_name, status::text as status, attempt, retry_from, meta,"
        " run_after > now() as run_after_in_future from workflow_states where batch_id = %s",
        (batch_id,),
    )
    return {r["item_id"]: r for r in rows}


def task_json(batch_id: UUID, item_id: UUID, step_name: str, attempt: int) -> dict[str, Any]:
    return {
        "batch_id": str(batch_id),
        "item_id": str(item_id),
        "step_name": step_name,
        "attempt": attempt,
    }


async def test_conduct_spawns_one_call_per_chunk_and_records_call_ids(
    api: PgStateAPI, conn: Conn
) -> None:
    batch_id = await api.create_batch(["step_a"], [company(i) for i in range(ITEMS)])
    fake = FakeModal()

    report = await conduct(api, ModalDispatcher(api, fake.lookup, chunk_size=CHUNK))

    assert (report.claimed, report.dispatched, report.dispatch_failures) == (ITEMS, ITEMS, 0)
    assert report.by_function == {"step_a": ITEMS}
    assert fake.looked_up == ["step_a"]
    assert [(s.function_name, len(s.tasks)) for s in fake.spawns] == [
        ("step_a", 100),
        ("step_a", 100),
        ("step_a", 50),
    ]
    rows = await workflow_rows(conn, batch_id)
    # Each spawn carries exactly the claimed rows' task JSON; together, every row once.
    sent = [t for s in fake.spawns for t in s.tasks]
    assert sorted(sent, key=lambda t: t["item_id"]) == sorted(
        (task_json(batch_id, item, "step_a", 1) for item in rows), key=lambda t: t["item_id"]
    )
    for spawn in fake.spawns:
        for task in spawn.tasks:
            row = rows[UUID(task["item_id"])]
            assert (row["status"], row["attempt"]) == ("QUEUED", 1)
            assert row["meta"]["dispatch"]["call_id"] == spawn.call_id
            assert row["meta"]["dispatch"]["attempt"] == 1


async def test_a_failed_spawn_gives_back_only_the_unsent_rows(api: PgStateAPI, conn: Conn) -> None:
    batch_id = await api.create_batch(["step_a"], [company(i) for i in range(ITEMS)])
    fake = FakeModal(fail_on=2)

    report = await conduct(api, ModalDispatcher(api, fake.lookup, chunk_size=CHUNK))

    assert (report.claimed, report.dispatched, report.dispatch_failures) == (ITEMS, CHUNK, 150)
    # The spawn after the failed one is never attempted: its rows are part of the unsent.
    assert [(s.call_id, len(s.tasks)) for s in fake.spawns] == [("fc-0001", 100), (None, 100)]
    rows = await workflow_rows(conn, batch_id)
    sent = {UUID(t["item_id"]) for t in fake.spawns[0].tasks}
    unsent = set(rows) - sent
    assert len(unsent) == 150
    for item in sent:
        row = rows[item]
        assert (row["status"], row["attempt"]) == ("QUEUED", 1)
        assert row["meta"]["dispatch"]["call_id"] == "fc-0001"
        assert "released" not in row["meta"]
    for item in unsent:
        row = rows[item]
        # Handed back with the attempt refunded, held back for the dispatch retry delay.
        assert (row["status"], row["attempt"], row["retry_from"]) == ("PENDING", 1, 1)
        assert "dispatch" not in row["meta"]
        released = row["meta"]["released"]
        assert released["attempt"] == 1
        assert "dispatch to step_a failed" in released["reason"]
        assert "RuntimeError: modal is down" in released["reason"]
        assert row["run_after_in_future"]


def test_modal_function_lookup_is_lazy_and_cached() -> None:
    lookup = modal_function_lookup("enrichment-workers")

    function = lookup("step_a")

    assert lookup("step_a") is function
    assert lookup("step_b") is not function
    # A real, unhydrated modal.Function: nothing was contacted, no credentials were needed.
    assert isinstance(cast(object, function), modal.Function)


async def test_the_modal_function_body_completes_dispatched_rows(
    api: PgStateAPI, conn: Conn, database_url: str
) -> None:
    """What Modal would run: each spawn's task JSON, through run_function_chunk."""
    raw = [
        {"name": "Acme Robotics, Inc.", "website": "HTTPS://WWW.ACMEROBOTICS.COM/about"},
        {"name": "beta foods ltd", "email": "sales@betafoods.co.uk"},
        {"name": "Gamma Health GmbH", "website": "gammahealth.de"},
    ]
    batch_id = await api.create_batch(["normalize_domain", "clean_company_name"], raw)
    fake = FakeModal()

    # Two waves: the conductor dispatches the first step, the function completes it (which seeds
    # the second step), the conductor dispatches the second step, the function completes it.
    for step in ("normalize_domain", "clean_company_name"):
        fake.spawns.clear()
        report = await conduct(api, ModalDispatcher(api, fake.lookup, chunk_size=2))
        assert (report.claimed, report.dispatched) == (3, 3)
        assert [len(s.tasks) for s in fake.spawns] == [2, 1]
        for spawn in fake.spawns:
            assert spawn.function_name == step
            answer = await run_function_chunk(spawn.function_name, spawn.tasks)
            assert answer["completed"] == len(spawn.tasks), answer
            assert (answer["failed"], answer["refused"], answer["retried"]) == (0, 0, 0)

    rows = await fetch(
        conn,
        """
        select bi.seq, d.domain, c.name, ws.status::text as status, ws.attempt
        from batch_items bi
        join normalize_domain_results d on d.item_id = bi.id
        join clean_company_name_results c on c.item_id = bi.id
        join workflow_states ws on ws.item_id = bi.id and ws.step_name = 'clean_company_name'
        where bi.batch_id = %s order by bi.seq
        """,
        (batch_id,),
    )
    assert [(r["domain"], r["name"], r["status"], r["attempt"]) for r in rows] == [
        ("acmerobotics.com", "Acme Robotics", "COMPLETED", 1),
        ("betafoods.co.uk", "Beta Foods", "COMPLETED", 1),
        ("gammahealth.de", "Gamma Health", "COMPLETED", 1),
    ]
    batch = await fetch(conn, "select status::text as s from batches where id = %s", (batch_id,))
    assert batch == [{"s": "COMPLETED"}]
    # A second delivery of the same call (Modal retries a lost container) is refused row by row.
    again = await run_function_chunk(fake.spawns[0].function_name, fake.spawns[0].tasks)
    assert (again["completed"], again["refused"]) == (0, 2)


async def test_rows_never_sent_do_not_use_up_their_attempts(api: PgStateAPI, conn: Conn) -> None:
    batch_id = await api.create_batch(["step_a"], [company(i) for i in range(5)])
    max_attempts = 3  # the seeded registry's step_a
    for _ in range(max_attempts):
        report = await conduct(api, ModalDispatcher(api, FakeModal(fail_on=1).lookup))
        assert (report.claimed, report.dispatch_failures) == (5, 5)
        await make_ready(conn, batch_id)  # skip the backoff

    rows = await workflow_rows(conn, batch_id)
    # Never started by any worker...
    assert all(r["meta"].get("dispatch") is None for r in rows.values())
    # ...so never failed for good: a later conductor run can still send them.
    assert {r["status"] for r in rows.values()} == {"PENDING"}
    batch = await fetch(conn, "select status::text as s from batches where id = %s", (batch_id,))
    assert batch != [{"s": "FAILED"}]
