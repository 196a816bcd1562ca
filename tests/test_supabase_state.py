"""``SupabaseStateAPI`` beyond the contract suite: how answers map to errors, that the service-role
key never leaks, the factory's choice, and the PostgREST emulator's own fidelity.

The contract suite (``tests/contract``) runs every State API behaviour over the emulator; here,
scripted respx answers stand in for the outages and refusals a real Supabase project gives.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import traceback
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import psycopg
import pytest
import respx
from pydantic import SecretStr

from modal_app.entry import run_function_chunk
from shared.errors import (
    ConfigurationError,
    DatabaseUnavailable,
    EnrichError,
    InvalidInput,
    NotFound,
    RetryableError,
    TerminalError,
)
from shared.pg_state import PgStateAPI
from shared.settings import Settings, get_settings
from shared.state_api import StepResult
from shared.state_factory import open_state_api
from shared.supabase_state import SupabaseStateAPI
from tests.postgrest_emulator import (
    ANON_KEY,
    SERVICE_ROLE_KEY,
    SUPABASE_URL,
    emulate_supabase,
    make_jwt,
)

KEY = SecretStr(SERVICE_ROLE_KEY)
RPC = f"{SUPABASE_URL}/rest/v1/rpc"
HEADERS = {"apikey": SERVICE_ROLE_KEY, "Authorization": f"Bearer {SERVICE_ROLE_KEY}"}
COMPANY = {"website": "https://www.acme.co.uk/about", "name": "Acme Inc"}


@pytest.fixture
async def api() -> AsyncIterator[SupabaseStateAPI]:
    """A client whose answers each test scripts with respx (no database)."""
    client = await SupabaseStateAPI.open(SUPABASE_URL, KEY)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def emulated(dsn: str) -> AsyncIterator[tuple[SupabaseStateAPI, respx.MockRouter]]:
    """A client over the PostgREST emulator and this test's database."""
    async with emulate_supabase(dsn) as (_, router):
        client = await SupabaseStateAPI.open(SUPABASE_URL, KEY)
        try:
            yield client, router
        finally:
            await client.close()


def assert_no_key(text: str) -> None:
    assert SERVICE_ROLE_KEY not in text
    # Not even the signature on its own.
    assert SERVICE_ROLE_KEY.rsplit(".", 1)[1] not in text


def full_text(exc: BaseException) -> str:
    """Everything a traceback shows, chained causes included."""
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) + repr(exc)


# The key never leaks ------------------------------------------------------------------------------


async def test_repr_never_shows_the_key(api: SupabaseStateAPI) -> None:
    assert repr(api) == f"SupabaseStateAPI(url={SUPABASE_URL!r})"
    assert_no_key(str(api))
    settings = Settings(supabase_url=SUPABASE_URL, supabase_service_role_key=KEY)
    assert_no_key(repr(settings))
    assert_no_key(str(settings.model_dump()))


@pytest.mark.parametrize(
    ("url", "key", "message"),
    [
        ("ftp://abc.supabase.co", KEY, r"SUPABASE_URL is not an http\(s\) URL"),
        (SUPABASE_URL, SecretStr(""), "supabase_key is required"),
    ],
)
async def test_a_bad_url_or_key_is_a_configuration_error(
    url: str, key: SecretStr, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        await SupabaseStateAPI.open(url, key)
    assert_no_key(full_text(caught.value))


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_refused_and_the_key_never_leaves_the_origin(
    api: SupabaseStateAPI, status: int
) -> None:
    """httpx drops Authorization on a cross-origin redirect but forwards ``apikey``: following
    one would hand the service-role key to whichever host the Location names."""
    with respx.mock:
        respx.post(f"{RPC}/claim_steps").mock(
            return_value=httpx.Response(status, headers={"Location": "https://evil.example/x"})
        )
        elsewhere = respx.route(host="evil.example").mock(return_value=httpx.Response(200))
        with pytest.raises(ConfigurationError, match=f"HTTP {status} redirecting") as caught:
            await api.claim(10)
    assert not elsewhere.called
    assert "evil.example" in str(caught.value) and "SUPABASE_URL" in str(caught.value)
    assert_no_key(full_text(caught.value))


@pytest.mark.parametrize(
    "url", ["http://abcdefghijklmnopqrst.supabase.co", "http://10.0.0.5:8000", "http://[fe80::1]"]
)
async def test_plain_http_to_another_host_is_refused(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match=r"SUPABASE_URL must be an https:// URL"):
        await SupabaseStateAPI.open(url, KEY)
    # The settings refuse it too, before anything is opened (a one-line error naming the variable).
    monkeypatch.setenv("SUPABASE_URL", url)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match=r"bad setting: SUPABASE_URL: .*https://"):
            get_settings()
    finally:
        monkeypatch.delenv("SUPABASE_URL")
        get_settings.cache_clear()


@pytest.mark.parametrize(
    "url", ["http://localhost:54321", "http://127.0.0.1:54321", "http://[::1]:54321"]
)
async def test_plain_http_to_this_machine_is_allowed(url: str) -> None:
    """The local Supabase stack (supabase start) answers on http://127.0.0.1:54321."""
    assert Settings(supabase_url=url).supabase_url == url
    async with await SupabaseStateAPI.open(url, KEY) as api:
        with respx.mock:
            respx.post(f"{url}/rest/v1/rpc/cancel_batch").mock(
                return_value=httpx.Response(200, json=3)
            )
            assert await api.cancel_batch(uuid.uuid4()) == 3


async def test_errors_and_logs_never_show_the_key(
    emulated: tuple[SupabaseStateAPI, respx.MockRouter], caplog: pytest.LogCaptureFixture
) -> None:
    api, router = emulated
    caplog.set_level(logging.DEBUG)
    down_url = "https://down.supabase.co"
    router.post(url__startswith=down_url).mock(side_effect=httpx.ConnectError("refused"))
    down = await SupabaseStateAPI.open(down_url, KEY)
    errors: list[BaseException] = []

    batch_id = await api.create_batch(["step_a"], [COMPANY])
    await api.claim(10, batch_ids=[batch_id])
    for call in (
        lambda: api.batch_progress(uuid.uuid4()),  # NotFound
        lambda: api.claim(0),  # InvalidInput
        lambda: api.create_batch(["no_such_step"], [COMPANY]),  # InvalidInput with a hint
        lambda: down.cancel_batch(batch_id),  # DatabaseUnavailable
    ):
        with pytest.raises(EnrichError) as caught:
            await call()
        errors.append(caught.value)
    await down.close()

    assert {type(e) for e in errors} == {NotFound, InvalidInput, DatabaseUnavailable}
    for error in errors:
        assert_no_key(full_text(error))
    assert caplog.records  # httpx logged the requests
    assert_no_key(caplog.text)
    assert_no_key("\n".join(repr(r.__dict__) for r in caplog.records))


class _EmptyRpc(BaseHTTPRequestHandler):
    """A real HTTP server answering every RPC with ``[]``; remembers the headers it got."""

    seen: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        _EmptyRpc.seen.append({k.lower(): v for k, v in self.headers.items()})
        body = json.dumps([]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass


@pytest.fixture
def local_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EmptyRpc)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


async def test_debug_logs_of_real_http_never_show_the_key(
    local_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Over a real socket (no respx), with httpx, httpcore and everything else at DEBUG."""
    caplog.set_level(logging.DEBUG)
    async with await SupabaseStateAPI.open(local_server, KEY) as api:
        assert await api.claim(1) == []
        assert await api.start([]) == []

    assert _EmptyRpc.seen and _EmptyRpc.seen[-1]["apikey"] == SERVICE_ROLE_KEY  # sent, as needed
    assert any(r.name.startswith("httpcore") for r in caplog.records)
    assert_no_key(caplog.text)


async def test_a_closed_port_is_database_unavailable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with await SupabaseStateAPI.open(f"http://127.0.0.1:{port}", KEY) as api:
        with pytest.raises(DatabaseUnavailable, match="ConnectError") as caught:
            await api.sweep_expired_leases()
    assert_no_key(full_text(caught.value))


# Transport failures and 5xx are retryable --------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectError("[Errno 111] Connection refused"),
        httpx.ConnectTimeout(""),
        httpx.ReadTimeout(""),
        httpx.RemoteProtocolError("Server disconnected without sending a response."),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_transport_errors_are_database_unavailable(
    api: SupabaseStateAPI, failure: Exception
) -> None:
    with respx.mock:
        respx.post(f"{RPC}/cancel_batch").mock(side_effect=failure)
        with pytest.raises(DatabaseUnavailable, match="cancel_batch") as caught:
            await api.cancel_batch(uuid.uuid4())
    assert isinstance(caught.value, RetryableError)
    assert type(failure).__name__ in str(caught.value)


UNAVAILABLE: list[tuple[int, Any, dict[str, str]]] = [
    (503, "<html><body>Service Unavailable</body></html>", {"Content-Type": "text/html"}),
    (502, {"message": "An invalid response was received from the upstream server"}, {}),
    (500, "", {}),
    (520, "error code: 520", {"Content-Type": "text/plain"}),
    (544, {"message": "upstream request timeout"}, {}),
    (429, {"message": "Too many requests"}, {}),
    (
        503,
        {"code": "PGRST002", "message": "Could not query the database for the schema cache."},
        {},
    ),
    (504, {"code": "PGRST003", "message": "Timed out acquiring connection from pool."}, {}),
    (503, {"code": "08006", "message": "connection failure"}, {}),
    (500, {"code": "57014", "message": "canceling statement due to statement timeout"}, {}),
]


def scripted(status: int, body: Any, headers: dict[str, str]) -> httpx.Response:
    if isinstance(body, str):
        return httpx.Response(status, text=body, headers=headers)
    return httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize(("status", "body", "headers"), UNAVAILABLE)
async def test_unavailable_answers_are_database_unavailable(
    api: SupabaseStateAPI, status: int, body: Any, headers: dict[str, str]
) -> None:
    with respx.mock:
        route = respx.post(f"{RPC}/claim_steps").mock(return_value=scripted(status, body, headers))
        with pytest.raises(DatabaseUnavailable):
            await api.claim(10)
    assert route.call_count == 1  # supabase-py's own retries are off


async def test_a_rolled_back_call_runs_again(api: SupabaseStateAPI) -> None:
    # PostgREST answers 40* (transaction rollback) with a 500 (PostgREST docs, "Errors": SQLSTATE
    # to HTTP status). A deadlock rolled the whole call back, so running it again is safe.
    deadlock = httpx.Response(500, json=pgrst("40P01", "deadlock detected"))
    with respx.mock:
        route = respx.post(f"{RPC}/cancel_batch").mock(
            side_effect=[deadlock, httpx.Response(200, json=3)]
        )
        assert await api.cancel_batch(uuid.uuid4()) == 3
    assert route.call_count == 2
    serialization = httpx.Response(500, json=pgrst("40001", "could not serialize access"))
    with respx.mock:
        route = respx.post(f"{RPC}/claim_steps").mock(return_value=serialization)
        with pytest.raises(DatabaseUnavailable, match="serialize"):
            await api.claim(10)
    assert route.call_count == 5  # four reruns, then the error


# PostgREST's error JSON maps to our errors --------------------------------------------------------


def pgrst(code: str, message: str, hint: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "details": None, "hint": hint}


REFUSALS: list[tuple[int, dict[str, Any], type[EnrichError], str]] = [
    (
        400,
        pgrst("22023", 'blueprint step "x" is not in enrichment_registry', "known steps: a, b"),
        InvalidInput,
        'blueprint step "x" is not in enrichment_registry (known steps: a, b)',
    ),
    (400, pgrst("22P02", "invalid input syntax for type uuid"), InvalidInput, "type uuid"),
    # PostgREST answers P0002 with a 500: the SQLSTATE decides, not the status.
    (500, pgrst("P0002", "batch 1 not found"), NotFound, "batch 1 not found"),
    (400, pgrst("P0001", "some raise"), EnrichError, "some raise"),
    (404, pgrst("PGRST202", "Could not find the function public.x(p_y)"), EnrichError, "PGRST202"),
    (401, pgrst("PGRST301", "JWT cryptographic operation failed"), ConfigurationError, "key"),
    (401, pgrst("PGRST303", "JWT expired"), ConfigurationError, "JWT expired"),
    (403, pgrst("42501", "permission denied for function claim_steps"), ConfigurationError, "role"),
    (401, {"message": "Invalid API key", "hint": "Double check"}, ConfigurationError, "Invalid"),
    (
        401,
        {"message": "No API key found in request", "hint": "No `apikey` request header"},
        ConfigurationError,
        "No API key",
    ),
]


@pytest.mark.parametrize(("status", "body", "expected", "fragment"), REFUSALS)
async def test_postgrest_errors_map_to_our_errors(
    api: SupabaseStateAPI,
    status: int,
    body: dict[str, Any],
    expected: type[EnrichError],
    fragment: str,
) -> None:
    with respx.mock:
        respx.post(f"{RPC}/retry_failed").mock(return_value=httpx.Response(status, json=body))
        with pytest.raises(EnrichError) as caught:
            await api.retry_failed(uuid.uuid4())
    assert type(caught.value) is expected
    assert fragment in str(caught.value)
    assert not isinstance(caught.value, RetryableError)
    if expected is not EnrichError:
        assert isinstance(caught.value, TerminalError)


async def test_an_unexpected_answer_shape_is_an_error(api: SupabaseStateAPI) -> None:
    with respx.mock:
        respx.post(f"{RPC}/claim_steps").mock(return_value=httpx.Response(200, json={"a": 1}))
        respx.post(f"{RPC}/cancel_batch").mock(return_value=httpx.Response(200, text="<html>"))
        with pytest.raises(EnrichError, match="expected a JSON array"):
            await api.claim(1)
        with pytest.raises(EnrichError, match="expected an integer"):
            await api.cancel_batch(uuid.uuid4())


async def test_step_results_are_encoded_like_postgres(
    emulated: tuple[SupabaseStateAPI, respx.MockRouter], conn: psycopg.AsyncConnection[Any]
) -> None:
    api, _ = emulated
    batch_id = await api.create_batch(["step_a"], [COMPANY])
    [claimed] = await api.claim(1, batch_ids=[batch_id])
    await api.start([claimed.task])
    marker = uuid.uuid4()

    with pytest.raises(InvalidInput, match="not valid JSON"):
        await api.complete([StepResult(claimed.task, {"score": float("nan")})])
    [done] = await api.complete([StepResult(claimed.task, {"id": marker})])

    assert done.ok
    cur = await conn.execute("select result from step_a_results where batch_id = %s", (batch_id,))
    assert await cur.fetchall() == [({"id": str(marker)},)]


# The factory -------------------------------------------------------------------------------------


async def test_settings_read_the_supabase_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUPABASE_URL", SUPABASE_URL)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
    settings = Settings()
    assert settings.supabase_url == SUPABASE_URL
    assert settings.supabase_service_role_key is not None
    assert settings.supabase_service_role_key.get_secret_value() == SERVICE_ROLE_KEY
    assert_no_key(repr(settings))


async def test_factory_picks_supabase_when_both_variables_are_set(
    monkeypatch: pytest.MonkeyPatch, dsn: str
) -> None:
    monkeypatch.setenv("SUPABASE_URL", SUPABASE_URL)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
    monkeypatch.setenv("DATABASE_URL", dsn)  # Supabase wins over a database URL

    api = await open_state_api(Settings())
    try:
        assert isinstance(api, SupabaseStateAPI)
    finally:
        await api.close()


@pytest.mark.parametrize("missing", ["SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"])
async def test_factory_uses_postgres_unless_both_variables_are_set(
    monkeypatch: pytest.MonkeyPatch, dsn: str, missing: str, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SUPABASE_URL", SUPABASE_URL)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
    monkeypatch.delenv(missing)
    monkeypatch.setenv("DATABASE_URL", dsn)

    api = await open_state_api(Settings())
    try:
        assert isinstance(api, PgStateAPI)
    finally:
        await api.close()
    assert missing in caplog.text  # the half-configured Supabase is reported
    assert_no_key(caplog.text)


async def test_a_modal_worker_chunk_runs_over_supabase(
    monkeypatch: pytest.MonkeyPatch, dsn: str, conn: psycopg.AsyncConnection[Any]
) -> None:
    """What a Modal function does with the ``enrichment-supabase`` secret, end to end."""
    monkeypatch.setenv("SUPABASE_URL", SUPABASE_URL)
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", SERVICE_ROLE_KEY)
    monkeypatch.delenv("DATABASE_URL", raising=False)
    get_settings.cache_clear()
    try:
        async with emulate_supabase(dsn) as (_, router):
            api = await SupabaseStateAPI.open(SUPABASE_URL, KEY)
            try:
                batch_id = await api.create_batch(["normalize_domain"], [COMPANY])
                claimed = await api.claim(10, batch_ids=[batch_id])
                report = await run_function_chunk(
                    "normalize_domain", [c.task.to_json() for c in claimed]
                )
                progress = await api.batch_progress(batch_id)
            finally:
                await api.close()
            rpc_calls = {call.request.url.path.rsplit("/", 1)[1] for call in router.calls}
    finally:
        get_settings.cache_clear()

    assert report["completed"] == 1, report["errors"]
    assert progress.status == "COMPLETED"
    assert {"start_steps", "complete_steps"} <= rpc_calls
    cur = await conn.execute(
        "select domain from normalize_domain_results where batch_id = %s", (batch_id,)
    )
    assert await cur.fetchall() == [("acme.co.uk",)]


async def test_a_results_table_added_later_is_writable_by_the_service_role(
    emulated: tuple[SupabaseStateAPI, respx.MockRouter], conn: psycopg.AsyncConnection[Any]
) -> None:
    """A new step's results table, created after the migrations, works over REST at once: the
    service role gets Supabase's default privileges on plain PostgreSQL too."""
    api, _ = emulated
    await conn.execute(
        "create table public.verify_results (batch_id uuid not null, item_id uuid not null,"
        " attempt integer not null, result jsonb not null,"
        " updated_at timestamptz not null default now(), primary key (batch_id, item_id));"
        " alter table public.verify_results enable row level security"
    )
    await conn.execute(
        "insert into enrichment_registry (step_name, modal_function_name, results_table)"
        " values ('verify', 'noop', 'verify_results')"
    )
    batch_id = await api.create_batch(["verify"], [COMPANY])
    [claimed] = await api.claim(1, batch_ids=[batch_id])
    [started] = await api.start([claimed.task])

    [done] = await api.complete([StepResult(started.task, {"verified": True})])

    assert done.ok
    cur = await conn.execute("select result from verify_results where batch_id = %s", (batch_id,))
    assert await cur.fetchall() == [({"verified": True},)]


# The emulator answers as PostgREST does ----------------------------------------------------------


@pytest.fixture
async def rest(dsn: str) -> AsyncIterator[httpx.AsyncClient]:
    """Raw HTTP to the emulator, to check what it answers."""
    async with emulate_supabase(dsn), httpx.AsyncClient(base_url=RPC) as client:
        yield client


async def test_emulator_requires_the_apikey_header(rest: httpx.AsyncClient) -> None:
    bearer = {"Authorization": f"Bearer {SERVICE_ROLE_KEY}"}
    answer = await rest.post(
        "/cancel_batch", json={"p_batch_id": str(uuid.uuid4())}, headers=bearer
    )
    assert answer.status_code == 401
    assert answer.json()["message"] == "No API key found in request"

    wrong = {**bearer, "apikey": "not-a-key"}
    answer = await rest.post("/cancel_batch", json={"p_batch_id": str(uuid.uuid4())}, headers=wrong)
    assert (answer.status_code, answer.json()["message"]) == (401, "Invalid API key")


@pytest.mark.parametrize(
    ("function", "body", "message"),
    [
        ("no_such_function", {"p_batch_id": "x"}, "public.no_such_function(p_batch_id)"),
        ("cancel_batch", {"p_batchid": "x"}, "public.cancel_batch(p_batchid)"),  # a typo
        ("cancel_batch", {"p_batch_id": "x", "p_extra": 1}, "public.cancel_batch(p_batch_id, p_ex"),
        (
            "create_batch",
            {"p_blueprint": ["step_a"]},
            "public.create_batch(p_blueprint)",
        ),  # p_items
        ("cancel_batch", {}, "public.cancel_batch without parameters"),
        ("claim_steps", {"limit": 1}, "public.claim_steps(limit)"),  # PgStateAPI's query names
    ],
)
async def test_emulator_checks_function_and_argument_names(
    rest: httpx.AsyncClient, function: str, body: dict[str, Any], message: str
) -> None:
    answer = await rest.post(f"/{function}", json=body, headers=HEADERS)

    assert answer.status_code == 404
    error = answer.json()
    assert error["code"] == "PGRST202"
    assert message in error["message"] and error["message"].endswith(" in the schema cache")
    assert error["details"].startswith(f"Searched for the function public.{function}")
    assert answer.headers["Proxy-Status"] == "PostgREST; error=PGRST202"
    if function == "cancel_batch":
        assert (
            error["hint"]
            == "Perhaps you meant to call the function public.cancel_batch(p_batch_id)"
        )


async def test_emulator_hints_at_a_close_function_name(rest: httpx.AsyncClient) -> None:
    answer = await rest.post("/cancel_batches", json={"p_batch_id": "x"}, headers=HEADERS)
    assert answer.json()["hint"] == "Perhaps you meant to call the function public.cancel_batch"


async def test_emulator_answers_in_postgrest_shapes(rest: httpx.AsyncClient) -> None:
    created = await rest.post(
        "/create_batch", json={"p_blueprint": ["step_a"], "p_items": [COMPANY]}, headers=HEADERS
    )
    assert created.status_code == 200
    batch_id = created.json()
    assert isinstance(batch_id, str) and uuid.UUID(batch_id)  # a scalar: the bare JSON value

    # Arguments with defaults may be left out; a table function answers an array of objects.
    claimed = await rest.post("/claim_steps", json={"p_limit": 5}, headers=HEADERS)
    assert claimed.status_code == 200
    [row] = claimed.json()
    assert (row["batch_id"], row["step_type"], row["attempt"]) == (batch_id, "SYNC", 1)
    # uuid[] from a JSON array, through json_to_recordset.
    none_left = await rest.post(
        "/claim_steps", json={"p_limit": 5, "p_batch_ids": [batch_id]}, headers=HEADERS
    )
    assert none_left.json() == []

    progress = await rest.post("/batch_progress", json={"p_batch_id": batch_id}, headers=HEADERS)
    assert progress.json()["steps"] == {
        "step_a": {"PENDING": 0, "QUEUED": 1, "IN_PROGRESS": 0, "COMPLETED": 0, "FAILED": 0}
    }


async def test_emulator_maps_sql_errors_to_postgrest_statuses(rest: httpx.AsyncClient) -> None:
    missing = str(uuid.uuid4())
    not_found = await rest.post("/batch_progress", json={"p_batch_id": missing}, headers=HEADERS)
    assert not_found.status_code == 500  # P0*: PL/pgSQL errors other than P0001
    assert not_found.json() == {
        "code": "P0002",
        "message": f"batch {missing} not found",
        "details": None,
        "hint": None,
    }

    invalid = await rest.post("/claim_steps", json={"p_limit": 0}, headers=HEADERS)
    assert (invalid.status_code, invalid.json()["code"]) == (400, "22023")

    bad_uuid = await rest.post("/cancel_batch", json={"p_batch_id": "nope"}, headers=HEADERS)
    assert (bad_uuid.status_code, bad_uuid.json()["code"]) == (400, "22P02")


async def test_emulator_runs_as_the_jwt_role(rest: httpx.AsyncClient, dsn: str) -> None:
    anon = {"apikey": ANON_KEY, "Authorization": f"Bearer {ANON_KEY}"}
    refused = await rest.post("/claim_steps", json={"p_limit": 1}, headers=anon)
    assert refused.status_code == 401  # 42501 without a signed-in role
    assert refused.json()["code"] == "42501"
    assert refused.headers["WWW-Authenticate"] == "Bearer"

    client_id = uuid.uuid4()
    user = make_jwt(
        {
            "role": "authenticated",
            "sub": str(uuid.uuid4()),
            "app_metadata": {"client_id": str(client_id)},
        }
    )
    as_user = {"apikey": ANON_KEY, "Authorization": f"Bearer {user}"}
    forbidden = await rest.post("/claim_steps", json={"p_limit": 1}, headers=as_user)
    assert (forbidden.status_code, forbidden.json()["code"]) == (403, "42501")
    # create_batch takes the client from the JWT's claims (request.jwt.claims).
    created = await rest.post(
        "/create_batch", json={"p_blueprint": ["step_a"], "p_items": [COMPANY]}, headers=as_user
    )
    assert created.status_code == 200, created.json()
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("select client_id from batches where id = %s", (created.json(),))
        assert await cur.fetchone() == (client_id,)

    expired = make_jwt({"role": "service_role", "exp": 1})
    answer = await rest.post(
        "/claim_steps",
        json={"p_limit": 1},
        headers={"apikey": SERVICE_ROLE_KEY, "Authorization": f"Bearer {expired}"},
    )
    assert (answer.status_code, answer.json()["code"], answer.json()["message"]) == (
        401,
        "PGRST303",
        "JWT expired",
    )
