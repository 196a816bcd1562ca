"""The Database Webhook (migration 20261122000600_database_webhooks.sql) and its Prefect side.

pg_net is not installed here, so the tests create a fake ``net.http_post`` with pg_net's signature
(``url text, body jsonb, params jsonb, headers jsonb, timeout_milliseconds int``, returning the
request id) that records each call in ``net.test_requests`` within the calling transaction, as
pg_net queues its requests in ``net.http_request_queue``. The fake exists before the migrations
run, so the wake-up trigger posts from the first statement, exactly as on Supabase where pg_net is
already there.

Waiting for a debounce window to pass is done by polling the database clock, never by sleeping a
fixed time; everything else is checked right after the statements that cause it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml  # type: ignore[import-untyped]
from jinja2 import StrictUndefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prefect.events import Event
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.events.schemas.events import ResourceSpecification
from prefect.server.utilities.user_templates import render_user_template_sync
from psycopg.rows import dict_row

from shared.db.migrate import migrate

from .conftest import PgServer

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = (ROOT / "deploy" / "prefect_webhook_template.json.j2").read_text()
HOOK_URL = "https://api.prefect.cloud/hooks/test-slug_0123"
SOURCE = "abcdefghijklmnopqrst"
DEADLINE_S = 10.0

FAKE_NET = """
create schema net;
create table net.test_requests (
  id bigint generated always as identity primary key,
  url text not null,
  body jsonb,
  params jsonb,
  headers jsonb,
  timeout_milliseconds integer,
  called_at timestamptz not null default clock_timestamp()
);
-- pg_net's signature and defaults (Supabase docs, pg_net: http_post).
create function net.http_post(
  url text,
  body jsonb default '{}'::jsonb,
  params jsonb default '{}'::jsonb,
  headers jsonb default '{"Content-Type": "application/json"}'::jsonb,
  timeout_milliseconds integer default 2000
) returns bigint
language sql volatile
as $$
  insert into net.test_requests (url, body, params, headers, timeout_milliseconds)
  values (url, body, params, headers, timeout_milliseconds)
  returning id
$$;
"""

FAKE_CRON = """
create schema cron;
create table cron.job (
  jobid bigserial primary key, jobname text unique, schedule text, command text
);
create function cron.schedule(job_name text, schedule text, command text) returns bigint
language sql as $$
  insert into cron.job (jobname, schedule, command) values (job_name, schedule, command)
  on conflict (jobname) do update set schedule = excluded.schedule, command = excluded.command
  returning jobid
$$;
"""


# Fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def webhook_template_db(pg_server: PgServer) -> Iterator[str]:
    """A database with the fake pg_net, then every migration and the seed (once per module)."""
    name = f"enrich_webhook_template_{uuid.uuid4().hex[:8]}"
    dsn = pg_server.create_database(name)
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(FAKE_NET)
        asyncio.run(migrate(dsn))
        yield name
    finally:
        pg_server.drop_database(name)


@pytest.fixture
def wdsn(pg_server: PgServer, webhook_template_db: str) -> Iterator[str]:
    """A fresh copy of the fake-pg_net database for this test."""
    name = f"w_{uuid.uuid4().hex}"
    url = pg_server.create_database(name, template=webhook_template_db)
    try:
        yield url
    finally:
        pg_server.drop_database(name)


# Helpers ------------------------------------------------------------------------------------------

Conn = psycopg.Connection[dict[str, Any]]


def connect(dsn: str) -> Conn:
    return psycopg.connect(dsn, autocommit=True, row_factory=dict_row)


def configure(
    conn: Conn,
    *,
    url: str | None = HOOK_URL,
    window: float | None = None,
    source: str | None = SOURCE,
) -> None:
    settings = {
        "prefect_webhook_url": url,
        "webhook_debounce_seconds": None if window is None else str(window),
        "webhook_source": source,
    }
    for key, value in settings.items():
        if value is not None:
            conn.execute(
                "insert into public.enrichment_settings (key, value) values (%s, %s)"
                " on conflict (key) do update set value = excluded.value",
                (key, value),
            )


def requests(conn: Conn) -> list[dict[str, Any]]:
    return conn.execute("select * from net.test_requests order by id").fetchall()


def pending_count(conn: Conn) -> int:
    row = conn.execute("select count(*) as n from public.enrichment_webhook_pending").fetchone()
    assert row is not None
    return int(row["n"])


def make_batch(conn: Conn, items: int = 1) -> str:
    row = conn.execute(
        "select public.create_batch('[\"step_a\"]'::jsonb, %s::jsonb) as id",
        (json.dumps([{"n": i} for i in range(items)]),),
    ).fetchone()
    assert row is not None
    return str(row["id"])


def touch(conn: Conn, batch_id: str) -> None:
    """One statement that re-marks the batch's PENDING rows: a state change with ready rows."""
    conn.execute(
        "update public.workflow_states set updated_at = now() where batch_id = %s", (batch_id,)
    )


def wait_for_window(conn: Conn) -> None:
    """Poll until the debounce window after the last request has passed, by the database clock."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        row = conn.execute(
            "select d.last_sent_at is null or clock_timestamp() >= d.last_sent_at"
            " + make_interval(secs => public.enrichment_setting_number("
            "'webhook_debounce_seconds', 2)) as passed"
            " from public.enrichment_webhook_debounce d"
        ).fetchone()
        assert row is not None
        if row["passed"]:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the debounce window did not pass within {DEADLINE_S}s")
        time.sleep(0.01)


def flush(conn: Conn) -> int | None:
    row = conn.execute("select public.flush_state_webhook() as id").fetchone()
    assert row is not None
    return None if row["id"] is None else int(row["id"])


def assert_spaced(reqs: list[dict[str, Any]], window: float) -> None:
    """Consecutive requests were queued at least one window apart."""
    times = [r["called_at"] for r in reqs]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(gap >= timedelta(seconds=window) for gap in gaps), gaps


def render(body: Any, *, strict: bool = False) -> dict[str, Any]:
    """The event Prefect Cloud makes of ``body``: the webhook template rendered with Prefect's own
    user-template environment (sandboxed Jinja2, ChainableUndefined), or a strict one."""
    context = {"method": "POST", "headers": {"content-type": "application/json"}, "body": body}
    if strict:
        env = ImmutableSandboxedEnvironment(undefined=StrictUndefined)
        text = env.from_string(TEMPLATE).render(context)
    else:
        text = render_user_template_sync(TEMPLATE, context)
    rendered: dict[str, Any] = json.loads(text)
    return rendered


# The payload and the event ------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True])
def test_payload_renders_to_the_expected_event(wdsn: str, strict: bool) -> None:
    with connect(wdsn) as conn:
        configure(conn)
        batch_id = make_batch(conn, items=3)
        [req] = requests(conn)

    assert req["url"] == HOOK_URL
    assert req["headers"] == {"Content-Type": "application/json"}
    assert req["params"] == {}
    assert req["timeout_milliseconds"] == 5000
    body = req["body"]
    assert body["source"] == SOURCE
    assert body["op"] == "INSERT"
    assert body["batch_ids"] == [batch_id]
    assert (body["ready"], body["finished"], body["notifications"]) == (3, 0, 1)
    assert body["more_batches"] is False
    uuid.UUID(body["event_id"])

    event = render(body, strict=strict)
    assert event == {
        "event": "enrichment.state.changed",
        "id": body["event_id"],
        "resource": {
            "prefect.resource.id": f"enrichment.database.{SOURCE}",
            "prefect.resource.name": SOURCE,
            "enrichment.database": body["database"],
        },
        "payload": {
            "op": "INSERT",
            "batch_ids": [batch_id],
            "more_batches": False,
            "ready": 3,
            "finished": 0,
            "notifications": 1,
            "first_change_at": body["first_change_at"],
            "sent_at": body["sent_at"],
        },
    }
    parsed = Event.model_validate(event)
    assert parsed.resource.id == f"enrichment.database.{SOURCE}"
    assert str(parsed.id) == body["event_id"]


def test_the_event_matches_the_deployment_trigger(wdsn: str) -> None:
    """The trigger in prefect.yaml expects exactly what the template emits."""
    with connect(wdsn) as conn:
        configure(conn)
        make_batch(conn)
        [req] = requests(conn)
    event = Event.model_validate(render(req["body"]))
    config = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    [trigger_config] = config["deployments"][0]["triggers"]
    trigger = DeploymentEventTrigger.model_validate(trigger_config)
    assert event.event in trigger.expect
    assert isinstance(trigger.match, ResourceSpecification)
    assert trigger.match.matches(event.resource)  # Prefect's own resource matching


def test_template_survives_a_foreign_body() -> None:
    """Anything else posted to the webhook still renders to a valid event, not a 400."""
    for body in ({}, "not json", {"source": 'we"ird', "batch_ids": "x"}):
        Event.model_validate(render(body))


def test_no_url_means_no_request_and_no_error(wdsn: str) -> None:
    with connect(wdsn) as conn:
        configure(conn, url=None)
        batch_id = make_batch(conn)
        touch(conn, batch_id)
        assert requests(conn) == []
        assert pending_count(conn) == 0
        assert flush(conn) is None
        status = conn.execute("select public.state_webhook_status() as s").fetchone()
        assert status is not None
        assert status["s"]["configured"] is False and status["s"]["webhook"] is True


def test_vault_secret_is_preferred_and_the_token_sent(wdsn: str) -> None:
    with connect(wdsn) as conn:
        conn.execute(
            "create schema vault;"
            " create table vault.decrypted_secrets (name text unique, decrypted_secret text);"
            " insert into vault.decrypted_secrets values"
            " ('prefect_webhook_url', 'https://api.prefect.cloud/hooks/from-vault'),"
            " ('prefect_webhook_token', 'pnu_token')"
        )
        configure(conn)  # the settings table's URL is only a fallback
        make_batch(conn)
        [req] = requests(conn)
    assert req["url"] == "https://api.prefect.cloud/hooks/from-vault"
    assert req["headers"] == {
        "Content-Type": "application/json",
        "Authorization": "Bearer pnu_token",
    }


# Debounce -----------------------------------------------------------------------------------------


def test_suppressed_change_goes_out_with_the_next_change_after_the_window(wdsn: str) -> None:
    with connect(wdsn) as conn:
        configure(conn, window=0.3)
        first = make_batch(conn)
        touch(conn, first)  # inside the window: recorded, not sent
        assert len(requests(conn)) == 1
        assert pending_count(conn) == 1

        wait_for_window(conn)
        second = make_batch(conn)
        reqs = requests(conn)
        assert len(reqs) == 2
        body = reqs[1]["body"]
        assert body["op"] == "INSERT"
        assert body["notifications"] == 2
        assert body["batch_ids"] == [first, second]  # first seen first
        assert body["ready"] == 2
        assert pending_count(conn) == 0
        assert_spaced(reqs, 0.3)


def test_flush_sends_the_trailing_edge_once_the_window_passed(wdsn: str) -> None:
    with connect(wdsn) as conn:
        configure(conn, window=0.3)
        batch_id = make_batch(conn)
        touch(conn, batch_id)  # inside the window: pending
        wait_for_window(conn)
        assert flush(conn) is not None
        reqs = requests(conn)
        assert len(reqs) == 2
        assert reqs[1]["body"]["op"] == "FLUSH"
        assert reqs[1]["body"]["batch_ids"] == [batch_id]
        assert reqs[1]["body"]["notifications"] == 1
        wait_for_window(conn)
        assert flush(conn) is None  # nothing pending: nothing sent
        assert len(requests(conn)) == 2


def test_burst_of_statements_one_request_per_window_nothing_lost(wdsn: str) -> None:
    window = 0.2
    statements = 200
    with connect(wdsn) as conn:
        configure(conn, window=window)
        batch_id = make_batch(conn, items=2)
        started = time.monotonic()
        for _ in range(statements):
            touch(conn, batch_id)
        elapsed = time.monotonic() - started
        wait_for_window(conn)
        flush(conn)
        reqs = requests(conn)
        assert pending_count(conn) == 0

    assert_spaced(reqs, window)
    assert len(reqs) <= elapsed / window + 3
    # Every statement is in exactly one request: none lost, none counted twice.
    assert sum(r["body"]["notifications"] for r in reqs) == statements + 1
    assert all(r["body"]["batch_ids"] == [batch_id] for r in reqs)


def test_concurrent_connections_never_wait_and_lose_nothing(wdsn: str) -> None:
    window = 0.2
    threads, per_thread = 4, 40
    with connect(wdsn) as conn:
        configure(conn, window=window)
        batches = [make_batch(conn) for _ in range(threads)]
    errors: list[BaseException] = []

    def work(batch_id: str) -> None:
        try:
            with connect(wdsn) as c:
                # Waiting on any lock for 2 s would fail the statement (and this test).
                c.execute("set lock_timeout = '2s'")
                for _ in range(per_thread):
                    touch(c, batch_id)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(b,)) for b in batches]
    for w in workers:
        w.start()
    for w in workers:
        w.join(DEADLINE_S)
    assert not any(w.is_alive() for w in workers)
    assert errors == []

    with connect(wdsn) as conn:
        wait_for_window(conn)
        flush(conn)
        reqs = requests(conn)
        assert pending_count(conn) == 0
    assert_spaced(reqs, window)
    assert sum(r["body"]["notifications"] for r in reqs) == threads + threads * per_thread
    seen = {b for r in reqs for b in r["body"]["batch_ids"]}
    assert seen == set(batches)


def test_an_open_sender_does_not_block_other_transactions(wdsn: str) -> None:
    with connect(wdsn) as admin, connect(wdsn) as a, connect(wdsn) as b:
        configure(admin, window=0.3)
        batch_a, batch_b = make_batch(admin), make_batch(admin)
        wait_for_window(admin)
        flush(admin)  # the second batch's creation
        wait_for_window(admin)
        sent = len(requests(admin))
        b.execute("set lock_timeout = '500ms'")
        with a.transaction():
            touch(a, batch_a)  # A becomes the sender and holds the debounce row until commit
            touch(b, batch_b)  # B does not wait: it records its change
            assert pending_count(admin) == 1  # B's; A's own change is in A's uncommitted request
        reqs = requests(admin)
        assert len(reqs) == sent + 1 and reqs[-1]["body"]["batch_ids"] == [batch_a]
        wait_for_window(admin)
        flush(admin)
        reqs = requests(admin)
        assert len(reqs) == sent + 2 and reqs[-1]["body"]["batch_ids"] == [batch_b]


def test_a_rolled_back_sender_sends_nothing_and_keeps_the_pending_changes(wdsn: str) -> None:
    with connect(wdsn) as conn:
        configure(conn, window=0.3)
        batch_id = make_batch(conn)
        touch(conn, batch_id)  # pending
        wait_for_window(conn)
        with pytest.raises(RuntimeError), conn.transaction():
            touch(conn, batch_id)  # the sender: takes the pending change
            assert pending_count(conn) == 0
            raise RuntimeError("roll back")
        assert len(requests(conn)) == 1
        assert pending_count(conn) == 1
        flush(conn)
        assert len(requests(conn)) == 2


def test_a_failing_post_keeps_the_change_pending_and_the_statement_succeeds(wdsn: str) -> None:
    with connect(wdsn) as conn:
        configure(conn, window=0.2)
        conn.execute(
            "alter function net.http_post(text, jsonb, jsonb, jsonb, integer) rename to real_post;"
            " create function net.http_post(url text, body jsonb, params jsonb, headers jsonb,"
            " timeout_milliseconds integer) returns bigint language plpgsql as"
            " $$ begin raise exception 'pg_net worker down'; end $$"
        )
        batch_id = make_batch(conn)  # succeeds despite the failure
        assert requests(conn) == []
        assert pending_count(conn) == 1
        conn.execute(
            "drop function net.http_post(text, jsonb, jsonb, jsonb, integer);"
            " alter function net.real_post(text, jsonb, jsonb, jsonb, integer) rename to http_post"
        )
        touch(conn, batch_id)
        [req] = requests(conn)
        assert req["body"]["notifications"] == 2


def test_a_repeatable_read_transaction_records_instead_of_failing(wdsn: str) -> None:
    with connect(wdsn) as admin, connect(wdsn) as rr:
        configure(admin, window=0)
        mine, theirs = make_batch(admin), make_batch(admin)
        rr.execute("set default_transaction_isolation = 'repeatable read'")
        with rr.transaction():
            rr.execute("select 1")  # takes the snapshot
            touch(admin, theirs)  # another transaction sends, moving the debounce row
            touch(rr, mine)  # would lock a row updated since the snapshot: recorded instead
        assert len(requests(admin)) == 3
        assert pending_count(admin) == 1
        assert flush(admin) is not None


# Migrations and wiring ----------------------------------------------------------------------------


def test_plain_postgres_keeps_pg_notify_only(dsn: str) -> None:
    """The normal test template: no net schema, so the migration wired nothing."""
    with connect(dsn) as conn:
        row = conn.execute("select public.enable_state_webhooks() as r").fetchone()
        assert row is not None and "pg_notify only" in row["r"]
        configure(conn)
        make_batch(conn)
        assert pending_count(conn) == 0


def test_the_wake_up_trigger_posts_the_webhook_when_net_exists(wdsn: str) -> None:
    """One trigger per statement does both: pg_notify and, with pg_net, the webhook."""
    with connect(wdsn) as conn:
        triggers = conn.execute(
            "select count(*) as n from pg_trigger"
            " where tgrelid = 'public.workflow_states'::regclass and not tgisinternal"
            " and tgfoid = 'public.notify_state_change'::regproc"
        ).fetchone()
        assert triggers is not None and triggers["n"] == 2  # notify on insert, on update
        configure(conn)
        make_batch(conn)
        assert len(requests(conn)) == 1


def test_enable_later_is_idempotent_and_schedules_the_flush(dsn: str) -> None:
    with connect(dsn) as conn:
        conn.execute(FAKE_NET)
        conn.execute(FAKE_CRON)
        for _ in range(2):
            row = conn.execute("select public.enable_state_webhooks() as r").fetchone()
            assert row is not None
            assert row["r"] == "database webhook, pg_cron flush job"
        jobs = conn.execute("select jobname, schedule, command from cron.job order by jobname")
        assert [(j["jobname"], j["schedule"]) for j in jobs.fetchall()] == [
            ("enrichment-webhook-flush", "5 seconds"),
            ("enrichment-webhook-flush-cleanup", "17 * * * *"),
        ]
        configure(conn)
        make_batch(conn)
        assert len(requests(conn)) == 1


def test_api_roles_cannot_read_the_url(wdsn: str) -> None:
    with connect(wdsn) as conn:
        configure(conn)
        for role in ("anon", "authenticated"):
            for query in (
                "select * from public.enrichment_settings",
                "select * from public.enrichment_webhook_pending",
                "select public.enrichment_secret('prefect_webhook_url')",
            ):
                with pytest.raises(psycopg.errors.InsufficientPrivilege), conn.transaction():
                    conn.execute(f"set local role {role}")
                    conn.execute(query)
