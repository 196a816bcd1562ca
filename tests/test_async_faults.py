"""ASYNC steps under faults (issue 7), against real PostgreSQL and real processes.

1. The worker is killed between the provider accepting an item and the recording of the submission
   (``submit``). A real ``enrich run`` runs the step ``lost_submission``
   (``tests/plugins/lost_submission.py``): the provider (a file) gets each item with its callback
   URL, then the process SIGKILLs itself. The rows stay IN_PROGRESS on their start lease, not
   awaiting a callback. Whatever happens next, the first submission's callback is either accepted
   (and nothing re-submits the row) or refused (and the row is re-submitted), never both:

   a. the lease runs out, the sweep hands the row back and the next run re-submits it as attempt
      2: the first submission's callback is then 409 and changes nothing (and before the
      re-submission it is refused too); the second completes the row once;
   b. the callback comes before anything took the row back: it completes the row (it is
      IN_PROGRESS for that attempt), and the sweep, the orphan reclaim and the next run leave it;
   c. callbacks and sweeps race for the same rows: per row, exactly one of a or b.

2. Duplicate callbacks for the same rows at the same moment through two receiver processes: one
   result, one completion, the next step seeded once per row; one "applied" answer per row and
   "already applied" for the rest, never an error. The two receivers' bulk completions lock the
   same rows in opposite orders and deadlock now and then; the State API runs the rolled-back
   call again (``ROLLBACK_RERUNS``), where it used to answer 503 to the loser's whole burst.

Completions and seeded rows are counted by a trigger (``audit_transitions``), not inferred from
the final state: a row completed twice, or a next step inserted twice, would show there.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID

import httpx
import pytest
from psycopg.types.json import Jsonb

from shared.callbacks.receiver import create_callback_app, serve_callbacks
from shared.callbacks.token import CallbackKeys, sign
from shared.owner import host_prefix, owner_gone
from shared.pg_state import PgStateAPI
from shared.state_api import StepSubmission, TaskRef

from .contract import Conn, claim_and_start, company, fetch, fetch_one, states

T = TypeVar("T")
Answered = tuple[TaskRef, tuple[int, str]]

REPO = Path(__file__).resolve().parents[1]
ENRICH = Path(sys.executable).parent / "enrich"
SECRET = "async-faults-test-secret-0123456789abcdef"
KEYS = CallbackKeys(SECRET.encode())
STEP = "lost_submission"
RESULTS = "lost_submission_results"
CALLBACK_TIMEOUT_SECONDS = 60
DEADLINE = 20.0
# The answers to a callback for an attempt that is over; nothing is written either way. 409 once
# a newer attempt exists; before that (the row PENDING, same attempt number) complete_steps says
# wrong_status, which the receiver answers as a replay: 200 "already applied", although nothing of
# it was ever applied.
REFUSED = {(409, "stale attempt"), (200, "already applied")}

AUDIT = """
create table public.audit_transitions (
  item_id uuid not null,
  step_name text not null,
  attempt integer not null,
  old_status text,
  new_status text not null,
  at timestamptz not null default clock_timestamp()
);
create function public.audit_transition() returns trigger
language plpgsql
as $$
begin
  if tg_op = 'INSERT' or old.status is distinct from new.status then
    insert into public.audit_transitions (item_id, step_name, attempt, old_status, new_status)
    values (new.item_id, new.step_name, new.attempt,
            case when tg_op = 'UPDATE' then old.status::text end, new.status::text);
  end if;
  return null;
end
$$;
create trigger workflow_states_audit after insert or update on public.workflow_states
  for each row execute function public.audit_transition();
"""

RESULTS_TABLE = f"""
create table public.{RESULTS} (
  batch_id uuid not null,
  item_id uuid not null,
  attempt integer not null,
  result jsonb not null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  primary key (batch_id, item_id)
);
alter table public.{RESULTS} enable row level security;
"""

# A callback receiver as a process of its own: the production app (create_callback_app) served by
# serve_callbacks, keys from the environment (ENRICH_CALLBACK_SECRET); prints its port, serves
# until its stdin closes.
RECEIVER = """
import asyncio, sys
from shared.callbacks.receiver import create_callback_app, serve_callbacks
from shared.callbacks.token import load_keys
from shared.pg_state import PgStateAPI
from shared.settings import get_settings

class Observed:
    # The State API, saying on stderr why a call failed (the receiver answers 503, no more).
    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def complete(self, results):
        try:
            return await self.inner.complete(results)
        except Exception as exc:
            print(f"complete of {len(results)} rows failed: {exc}", file=sys.stderr, flush=True)
            raise

async def main() -> None:
    async with await PgStateAPI.open(sys.argv[1], max_size=4) as api:
        app = create_callback_app(Observed(api), load_keys(get_settings()))
        server = await serve_callbacks(app, port=0)
        print(server.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop()

asyncio.run(main())
"""


# Helpers ------------------------------------------------------------------------------------------


async def poll(check: Callable[[], Awaitable[T]], what: str, timeout: float = DEADLINE) -> T:
    """Await ``check()`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


def subprocess_env(dsn: str, home: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "ENRICH_HOME": str(home),
        "ENRICH_CALLBACK_SECRET": SECRET,
        "ENRICH_STEP_MODULES": "tests.plugins.lost_submission",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
    }
    for variable in ("ENRICH_CALLBACK_SECRET_PREVIOUS", "ENRICH_CALLBACK_BASE_URL"):
        env.pop(variable, None)
    return env


class EnrichRun:
    """``enrich run --batch ID`` as a subprocess, its output in a file."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, dsn: str, home: Path, batch_id: UUID) -> EnrichRun:
        log = home / f"run-{time.monotonic_ns()}.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                str(ENRICH),
                *("run", "--batch", str(batch_id), "--concurrency", "50"),
                cwd=REPO,
                env=subprocess_env(dsn, home),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return cls(proc, log)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait(self, timeout: float = DEADLINE) -> int:
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            pytest.fail(f"enrich run did not end within {timeout}s:\n{self.output()}")


@pytest.fixture
async def runs() -> AsyncIterator[list[EnrichRun]]:
    """Processes a test started; any still running at the end are killed."""
    started: list[EnrichRun] = []
    yield started
    for run in started:
        if run.proc.returncode is None:
            run.proc.kill()
            await run.proc.wait()


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
async def audited(conn: Conn) -> Conn:
    await conn.execute(AUDIT)
    return conn


@dataclass(frozen=True)
class Accepted:
    """What the provider got: one line of the provider log."""

    item_id: UUID
    attempt: int
    callback_url: str
    pid: int

    @property
    def token(self) -> str:
        return self.callback_url.rsplit("/callbacks/", 1)[1]

    @property
    def base_url(self) -> str:
        return self.callback_url.rsplit("/callbacks/", 1)[0]


def provider_log(home: Path) -> list[Accepted]:
    path = home / "provider.log"
    if not path.exists():
        return []
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    return [Accepted(UUID(d["item_id"]), d["attempt"], d["callback_url"], d["pid"]) for d in lines]


def body(item_id: UUID, attempt: int) -> dict[str, Any]:
    """The provider's answer for one submission (each submission answers differently)."""
    return {"request_id": f"req-{item_id}-{attempt}", "email": f"{item_id.hex[:8]}@a{attempt}.test"}


async def post(client: httpx.AsyncClient, url: str, data: dict[str, Any]) -> tuple[int, str]:
    response = await client.post(url, json=data)
    assert response.headers["content-type"] == "application/json", response.text
    return response.status_code, str(response.json()["status"])


async def register_step(
    conn: Conn, home: Path, *, timeout_seconds: float, crash_after: int
) -> None:
    await conn.execute(RESULTS_TABLE)
    config = {
        "timeout_seconds": timeout_seconds,
        "callback_timeout_seconds": CALLBACK_TIMEOUT_SECONDS,
        "max_attempts": 3,
        "backoff_seconds": 0,
        "provider_log": str(home / "provider.log"),
        "crash_attempts": 1,
        "crash_after": crash_after,
    }
    await conn.execute(
        "insert into enrichment_registry (step_name, type, modal_function_name, results_table,"
        " config) values (%s, 'ASYNC', %s, %s, %s)",
        (STEP, STEP, RESULTS, Jsonb(config)),
    )


async def rows_by_item(conn: Conn, batch_id: UUID) -> dict[UUID, dict[str, Any]]:
    return {r["item_id"]: r for r in await states(conn, batch_id, STEP)}


async def results_by_item(conn: Conn, batch_id: UUID) -> dict[UUID, dict[str, Any]]:
    rows = await fetch(conn, f"select * from {RESULTS} where batch_id = %s", (batch_id,))
    return {r["item_id"]: r for r in rows}


async def completions(conn: Conn, step: str) -> Counter[UUID]:
    """How many times each item's ``step`` row became COMPLETED."""
    rows = await fetch(
        conn,
        "select item_id from audit_transitions where step_name = %s and new_status = 'COMPLETED'",
        (step,),
    )
    return Counter(r["item_id"] for r in rows)


@asynccontextmanager
async def receiver_in_this_process(api: PgStateAPI) -> AsyncIterator[str]:
    """A receiver over real HTTP, for callbacks while no ``enrich run`` is alive."""
    server = await serve_callbacks(create_callback_app(api, KEYS), port=0)
    try:
        yield server.url
    finally:
        await server.stop()


@dataclass
class LostSubmissions:
    batch_id: UUID
    first: dict[UUID, Accepted]  # item -> the provider's record of attempt 1
    owner: str  # the lease owner, the killed process
    leases: dict[UUID, Any]  # item -> lease_expires_at after the kill


async def lose_submissions(
    api: PgStateAPI,
    conn: Conn,
    dsn: str,
    home: Path,
    runs: list[EnrichRun],
    *,
    items: int,
    timeout_seconds: float,
) -> LostSubmissions:
    """A batch of ``items`` rows whose provider accepted them, and whose ``enrich run`` was
    killed before it recorded a single submission."""
    await register_step(conn, home, timeout_seconds=timeout_seconds, crash_after=items)
    batch_id = await api.create_batch([STEP], [company(i) for i in range(items)])
    run = await EnrichRun.start(dsn, home, batch_id)
    runs.append(run)
    assert await run.wait() == -signal.SIGKILL, run.output()

    accepted = provider_log(home)
    assert sorted((a.attempt, a.pid) for a in accepted) == [(1, run.proc.pid)] * items
    first = {a.item_id: a for a in accepted}
    rows = await rows_by_item(conn, batch_id)
    assert set(rows) == set(first)
    owners = set()
    for row in rows.values():
        # Still the start's lease of attempt 1, held by the dead process; nothing awaits a callback.
        assert (row["status"], row["attempt"]) == ("IN_PROGRESS", 1), row
        assert "awaiting" not in row["meta"], row["meta"]
        lease = (row["lease_expires_at"] - row["started_at"]).total_seconds()
        assert timeout_seconds <= lease < CALLBACK_TIMEOUT_SECONDS, row
        owners.add(row["lease_owner"])
    [owner] = owners
    assert owner.startswith(f"{host_prefix()}{run.proc.pid}/") and owner_gone(owner)
    progress = await api.batch_progress(batch_id)
    assert progress.awaiting == {STEP: 0} and progress.running(STEP) == items
    assert await results_by_item(conn, batch_id) == {}
    leases = {item: row["lease_expires_at"] for item, row in rows.items()}
    return LostSubmissions(batch_id, first, owner, leases)


async def awaiting_attempt(conn: Conn, batch_id: UUID, items: set[UUID], attempt: int) -> bool:
    rows = await rows_by_item(conn, batch_id)
    return all(
        rows[i]["status"] == "IN_PROGRESS"
        and rows[i]["meta"].get("awaiting", {}).get("attempt") == attempt
        and rows[i]["lease_owner"] is None
        for i in items
    )


async def assert_completed_once(
    conn: Conn, batch_id: UUID, by_attempt: dict[UUID, int], home: Path
) -> None:
    """Each item completed exactly once, by the attempt given, with that submission's answer
    written once; the provider got attempts 1..that attempt of it, each once."""
    rows = await rows_by_item(conn, batch_id)
    results = await results_by_item(conn, batch_id)
    assert set(rows) == set(results) == set(by_attempt)
    for item, attempt in by_attempt.items():
        assert (rows[item]["status"], rows[item]["attempt"]) == ("COMPLETED", attempt)
        result = results[item]
        assert (result["attempt"], result["result"]) == (attempt, body(item, attempt))
        assert result["updated_at"] == result["created_at"]  # written once, never overwritten
    assert await completions(conn, STEP) == Counter(dict.fromkeys(by_attempt, 1))
    submissions = Counter((a.item_id, a.attempt) for a in provider_log(home))
    expected = {(item, n): 1 for item, attempt in by_attempt.items() for n in range(1, attempt + 1)}
    assert submissions == Counter(expected)
    batch = await fetch_one(conn, "select status::text from batches where id = %s", (batch_id,))
    assert batch["status"] == "COMPLETED"


# 1. Killed between submit and its recording ------------------------------------------------------


async def test_a_lost_submission_is_resubmitted_after_its_lease_and_its_callback_is_then_stale(
    api: PgStateAPI, audited: Conn, dsn: str, home: Path, runs: list[EnrichRun]
) -> None:
    conn, items = audited, 5
    lost = await lose_submissions(api, conn, dsn, home, runs, items=items, timeout_seconds=1)

    # The lease runs out: the sweep hands each row back as a lost worker's (not a missed callback).
    swept: dict[UUID, str] = {}

    async def all_swept() -> bool:
        swept.update((s.task.item_id, s.status) for s in await api.sweep_expired_leases())
        return len(swept) == items

    await poll(all_swept, "the sweep takes back the rows after their lease")
    assert swept == dict.fromkeys(lost.first, "PENDING")
    for row in (await rows_by_item(conn, lost.batch_id)).values():
        assert (row["status"], row["attempt"]) == ("PENDING", 1)
        error = row["meta"]["last_error"]
        assert error["kind"] == "lease_expired", error
        assert error["message"].startswith("lease expired while IN_PROGRESS (attempt 1)"), error

    async with httpx.AsyncClient(timeout=10) as client:
        # The first submission answers while its row waits to be re-submitted: refused, no change.
        before = await rows_by_item(conn, lost.batch_id)
        async with receiver_in_this_process(api) as base:
            answers = await asyncio.gather(
                *(
                    post(client, f"{base}/callbacks/{a.token}", body(i, 1))
                    for i, a in lost.first.items()
                )
            )
        assert set(answers) <= REFUSED, answers
        assert await rows_by_item(conn, lost.batch_id) == before
        assert await results_by_item(conn, lost.batch_id) == {}

        # The next run re-submits every row as attempt 2, and records it this time.
        run = await EnrichRun.start(dsn, home, lost.batch_id)
        runs.append(run)
        await poll(
            lambda: awaiting_attempt(conn, lost.batch_id, set(lost.first), 2),
            "attempt 2 submitted and recorded",
        )
        second = {a.item_id: a for a in provider_log(home) if a.attempt == 2}
        assert set(second) == set(lost.first)
        assert {a.pid for a in second.values()} == {run.proc.pid}
        receiver = next(iter(second.values())).base_url

        # Now the first submission's callbacks arrive: 409, and nothing changes.
        before = await rows_by_item(conn, lost.batch_id)
        answers = await asyncio.gather(
            *(
                post(client, f"{receiver}/callbacks/{a.token}", body(i, 1))
                for i, a in lost.first.items()
            )
        )
        assert answers == [(409, "stale attempt")] * items
        assert await rows_by_item(conn, lost.batch_id) == before
        assert await results_by_item(conn, lost.batch_id) == {}

        # The second submission's callbacks complete the rows, once; a duplicate is a replay.
        for expected in ("applied", "already applied"):
            answers = await asyncio.gather(
                *(post(client, a.callback_url, body(i, 2)) for i, a in second.items())
            )
            assert answers == [(200, expected)] * items

    assert await run.wait() == 0, run.output()
    assert "Traceback" not in run.output()
    await assert_completed_once(conn, lost.batch_id, dict.fromkeys(lost.first, 2), home)


async def test_a_callback_before_the_lost_submission_is_taken_back_completes_it_once(
    api: PgStateAPI, audited: Conn, dsn: str, home: Path, runs: list[EnrichRun]
) -> None:
    conn, items = audited, 5
    lost = await lose_submissions(api, conn, dsn, home, runs, items=items, timeout_seconds=2)

    # The provider is fast: its callbacks come before anything took the rows back. The rows are
    # IN_PROGRESS for that attempt: each callback is applied, as if its submission had been seen.
    async with httpx.AsyncClient(timeout=10) as client, receiver_in_this_process(api) as base:
        for expected in ("applied", "already applied"):
            answers = await asyncio.gather(
                *(
                    post(client, f"{base}/callbacks/{a.token}", body(i, 1))
                    for i, a in lost.first.items()
                )
            )
            assert answers == [(200, expected)] * items
    await assert_completed_once(conn, lost.batch_id, dict.fromkeys(lost.first, 1), home)

    # Nothing takes the rows back later: not the orphan reclaim (the holder is gone), not the
    # sweep once their old lease has passed, not the next run.
    assert await api.reclaim_orphaned([lost.owner]) == []
    last_lease = max(lost.leases.values())

    async def lease_passed() -> bool:
        row = await fetch_one(conn, "select clock_timestamp() > %s as passed", (last_lease,))
        return bool(row["passed"])

    await poll(lease_passed, "the old lease passes")
    assert await api.sweep_expired_leases() == []
    run = await EnrichRun.start(dsn, home, lost.batch_id)
    runs.append(run)
    assert await run.wait() == 0, run.output()
    await assert_completed_once(conn, lost.batch_id, dict.fromkeys(lost.first, 1), home)


async def test_callbacks_racing_the_sweep_for_lost_submissions_are_applied_or_refused(
    api: PgStateAPI, audited: Conn, dsn: str, home: Path, runs: list[EnrichRun]
) -> None:
    """Per row, whichever comes first wins: the callback (completed by attempt 1, never
    re-submitted) or the sweep (the callback refused, re-submitted, completed by attempt 2)."""
    conn, items = audited, 40
    lost = await lose_submissions(api, conn, dsn, home, runs, items=items, timeout_seconds=1)
    last_lease = max(lost.leases.values())

    async def lease_passed() -> bool:
        row = await fetch_one(conn, "select clock_timestamp() > %s as passed", (last_lease,))
        return bool(row["passed"])

    await poll(lease_passed, "the leases pass")

    # Wave after wave, four callbacks and one slice of the sweep (two rows) go at the same moment:
    # per row, whichever reaches it first wins.
    sweeper = await PgStateAPI.open(dsn, max_size=2)  # another connection, as the conductor's
    first_answers: dict[UUID, tuple[int, str]] = {}
    swept: set[UUID] = set()
    try:
        async with httpx.AsyncClient(timeout=10) as client, receiver_in_this_process(api) as base:
            order = list(lost.first.items())
            for wave in (order[i : i + 4] for i in range(0, items, 4)):
                sweep = asyncio.create_task(sweeper.sweep_expired_leases(limit=2))
                answers = await asyncio.gather(
                    *(post(client, f"{base}/callbacks/{a.token}", body(i, 1)) for i, a in wave)
                )
                first_answers.update((i, a) for (i, _), a in zip(wave, answers, strict=True))
                swept.update(s.task.item_id for s in await sweep)
    finally:
        await sweeper.close()

    applied = {i for i, answer in first_answers.items() if answer == (200, "applied")}
    refused = set(lost.first) - applied
    assert all(first_answers[i] in REFUSED for i in refused), first_answers
    # Never both: a row the sweep took back refused its callback, and only those did. (Each
    # slice sweeps 2 rows, ten slices at most 20: both outcomes always happen.)
    assert swept == refused
    assert applied and refused
    rows = await rows_by_item(conn, lost.batch_id)
    assert {i for i, r in rows.items() if r["status"] == "COMPLETED"} == applied
    assert all((rows[i]["status"], rows[i]["attempt"]) == ("PENDING", 1) for i in refused)

    if refused:  # the next run re-submits exactly the refused rows; their callbacks complete them
        run = await EnrichRun.start(dsn, home, lost.batch_id)
        runs.append(run)
        await poll(lambda: awaiting_attempt(conn, lost.batch_id, refused, 2), "attempt 2 recorded")
        second = {a.item_id: a for a in provider_log(home) if a.attempt == 2}
        assert set(second) == refused
        async with httpx.AsyncClient(timeout=10) as client:
            answers = await asyncio.gather(
                *(post(client, a.callback_url, body(i, 2)) for i, a in second.items())
            )
        assert answers == [(200, "applied")] * len(refused)
        assert await run.wait() == 0, run.output()

    await assert_completed_once(
        conn, lost.batch_id, {i: 1 if i in applied else 2 for i in lost.first}, home
    )


# 2. Duplicate callbacks at once, through two receiver processes -----------------------------------


@dataclass
class ReceiverProcess:
    proc: asyncio.subprocess.Process
    url: str
    log: Path


@asynccontextmanager
async def receiver_processes(dsn: str, home: Path, n: int) -> AsyncIterator[list[ReceiverProcess]]:
    started: list[ReceiverProcess] = []
    try:
        for k in range(n):
            log = home / f"receiver-{k}.log"
            with log.open("wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    *("-c", RECEIVER, dsn),
                    cwd=REPO,
                    env=subprocess_env(dsn, home),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=err,
                )
            started.append(ReceiverProcess(proc, "", log))
        for receiver in started:
            assert receiver.proc.stdout is not None
            line = await asyncio.wait_for(receiver.proc.stdout.readline(), DEADLINE)
            assert line.strip().isdigit(), receiver.log.read_text()
            receiver.url = f"http://127.0.0.1:{int(line)}"
        yield started
    finally:
        for receiver in started:
            if receiver.proc.stdin is not None:
                receiver.proc.stdin.close()
        for receiver in started:
            try:
                await asyncio.wait_for(receiver.proc.wait(), 10)
            except asyncio.TimeoutError:
                receiver.proc.kill()
                await receiver.proc.wait()


async def test_duplicate_callbacks_at_once_through_two_receiver_processes_apply_once(
    api: PgStateAPI, audited: Conn, dsn: str, home: Path
) -> None:
    conn, items, copies = audited, 200, 3
    batch_id = await api.create_batch(["step_async", "step_a"], [company(i) for i in range(items)])
    tasks = await claim_and_start(api, batch_id)
    submitted = await api.submit([StepSubmission(t, f"req-{t.item_id}-1") for t in tasks])
    assert all(s.ok for s in submitted), submitted
    expires = datetime.now(timezone.utc) + timedelta(hours=1)
    tokens = {t: sign(t, KEYS, expires_at=expires) for t in tasks}

    async with receiver_processes(dsn, home, 2) as receivers:
        limits = httpx.Limits(max_connections=items * copies, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            gate = asyncio.Event()

            async def send(receiver: ReceiverProcess, task: TaskRef) -> Answered:
                await gate.wait()
                url = f"{receiver.url}/callbacks/{tokens[task]}"
                return task, await post(client, url, body(task.item_id, 1))

            # Every row reaches both processes (one of them gets two of its copies), and they
            # see the rows in opposite orders: their bulk completions lock overlapping rows in
            # opposite orders at the same moment.
            copies_of: list[list[TaskRef]] = [[] for _ in receivers]
            for k, task in enumerate(tasks):
                for copy in range(copies):
                    copies_of[(k + copy) % len(receivers)].append(task)
            copies_of[1].reverse()
            sends = [
                asyncio.create_task(send(receivers[r], task))
                for position in range(max(map(len, copies_of)))
                for r, queue in enumerate(copies_of)
                for task in queue[position : position + 1]
            ]
            gate.set()
            answers = await asyncio.gather(*sends)
    logs = [r.log.read_text(errors="replace") for r in receivers]

    # One result, one completion, the next step seeded once: whatever the answers were.
    item_ids = {t.item_id for t in tasks}
    rows = await states(conn, batch_id, "step_async")
    assert {(r["item_id"], r["status"], r["attempt"]) for r in rows} == {
        (i, "COMPLETED", 1) for i in item_ids
    }
    results = await fetch(conn, "select * from step_async_results where batch_id = %s", (batch_id,))
    assert len(results) == items
    for result in results:
        assert (result["attempt"], result["result"]) == (1, body(result["item_id"], 1))
        assert result["updated_at"] == result["created_at"]  # written once, never overwritten
    assert await completions(conn, "step_async") == Counter(dict.fromkeys(item_ids, 1))
    seeded = await fetch(
        conn,
        "select item_id from audit_transitions where step_name = 'step_a' and old_status is null",
    )
    assert Counter(r["item_id"] for r in seeded) == Counter(dict.fromkeys(item_ids, 1))
    progress = await api.batch_progress(batch_id)
    assert progress.steps["step_async"]["COMPLETED"] == items
    assert progress.steps["step_a"]["PENDING"] == items
    assert progress.awaiting == {"step_async": 0, "step_a": 0}

    # One "applied" answer per row, "already applied" for its other copies, never an error.
    by_row: dict[TaskRef, list[tuple[int, str]]] = {t: [] for t in tasks}
    for task, answer in answers:
        by_row[task].append(answer)
    assert all(a.count((200, "applied")) == 1 for a in by_row.values()), by_row
    others = Counter(a for answers_of in by_row.values() for a in answers_of if a[1] != "applied")
    failures = [line for text in logs for line in text.splitlines() if " failed: " in line]
    for text in logs:
        assert "Traceback" not in text, text
    assert others == {(200, "already applied"): items * (copies - 1)}, (others, failures)
