"""``clay_enrich`` (issue 7, item 4): the item goes to a Clay table's webhook (respx plays Clay's
side, built from its documented shapes: shared/providers/clay.py names the sources), and the
table's HTTP API column answers through the real HTTP callback receiver into
``clay_enrich_results``. A missing webhook URL stops ``enrich run`` before anything is written."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import httpx
import psycopg
import pytest
import respx
from click.testing import CliRunner, Result

from shared.cli.callbacks import callback_receiver
from shared.cli.main import main
from shared.cli.run_commands import preflight
from shared.errors import ConfigurationError, RetryableError, TerminalError
from shared.pg_state import PgStateAPI
from shared.providers.clay import AUTH_HEADER, check_clay_config
from shared.settings import get_settings
from shared.state_api import StepFailure, StepResult, TaskRef
from shared.steps import CALLBACK_PARSERS, HANDLERS, PREFLIGHTS, StepContext, Submitted
from shared.steps.clay_enrich import clay_enrich, parse_clay_callback
from shared.worker import run_chunk
from tests.contract import configure_step, fetch, states, tasks

Conn = psycopg.AsyncConnection[Any]

# A webhook URL as Clay hands them out; its id is the secret part.
SECRET_ID = "pull-in-data-from-a-webhook-5ecret1d"
CLAY_URL = f"https://api.clay.com/v3/sources/webhook/{SECRET_ID}"
TOKEN = "t0ken-s3cret"
PUBLIC_CALLBACK = "https://callbacks.example.com/callbacks/tok"
ACME = {
    "Company Name": "Acme Inc",
    "website": "https://www.acme.co.uk/about",
    "linkedin_url": "https://www.linkedin.com/company/acme",
}


@pytest.fixture
def clay_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The Clay webhook URL and token, as the Modal secret (or a shell) would provide them."""
    monkeypatch.setenv("CLAY_WEBHOOK_URL", CLAY_URL)
    monkeypatch.setenv("CLAY_WEBHOOK_TOKEN", TOKEN)
    yield


@pytest.fixture
def no_clay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CLAY_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("CLAY_WEBHOOK_TOKEN", raising=False)


async def _beat() -> None:
    return None


def context(
    callback_url: str | None = PUBLIC_CALLBACK,
    inputs: dict[str, dict[str, Any]] | None = None,
    **config: Any,
) -> StepContext:
    return StepContext(
        batch_id=uuid4(),
        item_id=uuid4(),
        step_name="clay_enrich",
        attempt=2,
        config=config,
        heartbeat=_beat,
        callback_url=callback_url,
        inputs=inputs if inputs is not None else {},
    )


def assert_no_secret(text: str) -> None:
    assert SECRET_ID not in text and TOKEN not in text, text


# The registry wiring -------------------------------------------------------------------------


def test_clay_enrich_is_registered_with_its_parser_and_preflight() -> None:
    assert HANDLERS["clay_enrich"] is clay_enrich
    assert CALLBACK_PARSERS["clay_enrich"] is parse_clay_callback
    assert PREFLIGHTS["clay_enrich"] is check_clay_config


async def test_the_seeded_registry_row(conn: Conn) -> None:
    [row] = await fetch(
        conn,
        "select type::text, modal_function_name, results_table, config from enrichment_registry"
        " where step_name = 'clay_enrich'",
    )
    assert (row["type"], row["modal_function_name"], row["results_table"]) == (
        "ASYNC",
        "clay_enrich",
        "clay_enrich_results",
    )
    config = row["config"]
    assert config["needs"] == ["normalize_domain"]
    assert (config["webhook_url_env"], config["auth_token_env"]) == (
        "CLAY_WEBHOOK_URL",
        "CLAY_WEBHOOK_TOKEN",
    )
    assert config["callback_timeout_seconds"] >= 600
    assert not any("clay.com" in json.dumps(v) for v in config.values())  # no URL in the database


# The preflight -------------------------------------------------------------------------------


def test_a_missing_webhook_url_names_the_variable(no_clay_env: None) -> None:
    with pytest.raises(ConfigurationError, match="CLAY_WEBHOOK_URL is unset or empty"):
        check_clay_config({})


def test_the_config_names_the_variables(monkeypatch: pytest.MonkeyPatch, no_clay_env: None) -> None:
    config = {"webhook_url_env": "CLAY_PEOPLE_URL", "auth_token_env": "CLAY_PEOPLE_TOKEN"}
    with pytest.raises(ConfigurationError, match="CLAY_PEOPLE_URL"):
        check_clay_config(config)
    monkeypatch.setenv("CLAY_PEOPLE_URL", CLAY_URL)
    check_clay_config(config)  # the token is optional, as Clay documents it
    with pytest.raises(ConfigurationError, match="CLAY_PEOPLE_TOKEN is unset"):
        check_clay_config({**config, "auth_token_required": True})
    monkeypatch.setenv("CLAY_PEOPLE_TOKEN", TOKEN)
    check_clay_config({**config, "auth_token_required": True})


def test_a_bad_url_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLAY_WEBHOOK_URL", f"api.clay.com/{SECRET_ID}")  # no scheme
    with pytest.raises(ConfigurationError, match="does not hold an http") as raised:
        check_clay_config({})
    assert_no_secret(str(raised.value))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"webhook_url_env": 5}, "config.webhook_url_env must name"),
        ({"auth_token_env": "not a name"}, "config.auth_token_env must name"),
        ({"auth_token_required": "yes"}, "auth_token_required must be true or false"),
        ({"request_timeout_seconds": 0}, "request_timeout_seconds must be a number > 0"),
    ],
)
def test_bad_config_values(clay_env: None, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        check_clay_config(config)


# What is posted to Clay ----------------------------------------------------------------------


@respx.mock(assert_all_called=True)
async def test_the_item_is_posted_with_the_earlier_domain_and_the_callback_url(
    respx_mock: respx.MockRouter, clay_env: None
) -> None:
    route = respx_mock.post(CLAY_URL).mock(return_value=httpx.Response(200, text="OK"))
    ctx = context(inputs={"normalize_domain": {"domain": "acme.com", "host": "www.acme.com"}})

    submitted = await clay_enrich(ACME, ctx)

    request = route.calls.last.request
    body = json.loads(request.content)
    assert body == {
        "name": "Acme Inc",
        "domain": "acme.com",  # normalize_domain's result, not the row's website
        "linkedin_url": "https://www.linkedin.com/company/acme",
        "callback_url": PUBLIC_CALLBACK,
        "batch_id": str(ctx.batch_id),
        "item_id": str(ctx.item_id),
        "attempt": 2,
        "step": "clay_enrich",
        "request_id": submitted.request_id,
    }
    assert submitted.request_id.startswith("clay-")
    assert request.headers[AUTH_HEADER] == TOKEN
    assert request.headers["content-type"] == "application/json"


@respx.mock
async def test_without_normalize_domain_the_rows_own_domain_is_used_and_no_token_is_sent(
    respx_mock: respx.MockRouter, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLAY_WEBHOOK_URL", CLAY_URL)
    monkeypatch.delenv("CLAY_WEBHOOK_TOKEN", raising=False)
    route = respx_mock.post(CLAY_URL).mock(return_value=httpx.Response(200, json={"id": "r-42"}))

    submitted = await clay_enrich({"name": "Acme", "email": "jane@acme.io"}, context())

    body = json.loads(route.calls.last.request.content)
    assert (body["name"], body["domain"], body["linkedin_url"]) == ("Acme", "acme.io", None)
    assert AUTH_HEADER not in route.calls.last.request.headers
    assert submitted == Submitted("r-42")  # Clay's own id, when its answer carries one


@respx.mock
async def test_an_item_with_nothing_to_enrich_is_not_sent(
    respx_mock: respx.MockRouter, clay_env: None
) -> None:
    route = respx_mock.post(CLAY_URL)
    with pytest.raises(TerminalError, match="nothing for Clay to enrich"):
        await clay_enrich({"industry": "Food", "website": "https://linkedin.com/x"}, context())
    assert not route.called


@respx.mock
async def test_a_callback_url_clay_cannot_reach_is_refused_before_paying(
    respx_mock: respx.MockRouter, clay_env: None
) -> None:
    route = respx_mock.post(CLAY_URL)
    for local in ("http://127.0.0.1:8787/callbacks/t", "http://localhost/c", "http://10.0.0.7/c"):
        with pytest.raises(ConfigurationError, match="ENRICH_CALLBACK_BASE_URL"):
            await clay_enrich(ACME, context(local))
    with pytest.raises(ConfigurationError, match="no callback receiver runs here"):
        await clay_enrich(ACME, context(None))
    assert not route.called


# How Clay's answers are read -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "error", "words"),
    [
        (429, RetryableError, "HTTP 429"),
        (500, RetryableError, "HTTP 500"),
        (503, RetryableError, "HTTP 503"),
        (408, RetryableError, "HTTP 408"),
        (401, TerminalError, "set CLAY_WEBHOOK_TOKEN"),
        (403, TerminalError, "set CLAY_WEBHOOK_TOKEN"),
        (404, TerminalError, "no webhook at the URL in CLAY_WEBHOOK_URL"),
        (400, TerminalError, "refused the row (HTTP 400"),
    ],
)
@respx.mock
async def test_http_answers(
    respx_mock: respx.MockRouter,
    clay_env: None,
    status: int,
    error: type[Exception],
    words: str,
) -> None:
    # Clay's answer echoes the URL and token: the message must not.
    echo = f"bad request to {CLAY_URL} with {TOKEN}"
    respx_mock.post(CLAY_URL).mock(return_value=httpx.Response(status, text=echo))
    with pytest.raises(error, match=re.escape(words)) as raised:
        await clay_enrich(ACME, context())
    assert_no_secret(str(raised.value))


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectTimeout("timed out"),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectError(f"cannot connect to {CLAY_URL}"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
)
@respx.mock
async def test_network_failures_are_retryable(
    respx_mock: respx.MockRouter, clay_env: None, failure: Exception
) -> None:
    respx_mock.post(CLAY_URL).mock(side_effect=failure)
    with pytest.raises(RetryableError, match=type(failure).__name__) as raised:
        await clay_enrich(ACME, context())
    assert_no_secret(str(raised.value))
    # httpx's exception (whose text may hold the URL) is not chained into tracebacks either.
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


@respx.mock
async def test_httpx_request_logs_do_not_show_the_webhook_url(
    respx_mock: respx.MockRouter, clay_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    respx_mock.post(CLAY_URL).mock(return_value=httpx.Response(200))
    with caplog.at_level(logging.DEBUG, logger="httpx"):
        await clay_enrich(ACME, context())
    lines = [r.getMessage() for r in caplog.records if r.name == "httpx"]
    assert any("https://api.clay.com/***" in line for line in lines), lines
    for line in lines:
        assert_no_secret(line)


# Clay's callback body ------------------------------------------------------------------------

TASK = TaskRef(uuid4(), uuid4(), "clay_enrich", 1)


def test_a_callback_body_maps_to_typed_fields_and_keeps_the_body() -> None:
    body = {
        "request_id": "clay-abc",
        "Company Name": "Acme Inc",
        "Domain": "acme.com",
        "LinkedIn URL": "https://www.linkedin.com/company/acme",
        "employees": "1,234",
        "size": "1,001-5,000 employees",
        "industry": "Food & Beverages",
        "country": "United Kingdom",
        "locality": "London",
        "description": "Makes anvils.",
        "founded": 1949,
        "extra": {"funding": "Series B"},
    }
    verdict = parse_clay_callback(TASK, body)
    assert isinstance(verdict, StepResult) and verdict.task == TASK
    assert verdict.result == {
        "company_name": "Acme Inc",
        "domain": "acme.com",
        "linkedin_url": "https://www.linkedin.com/company/acme",
        "website": None,
        "employee_count": 1234,
        "employee_range": "1,001-5,000 employees",
        "industry": "Food & Beverages",
        "country": "United Kingdom",
        "location": "London",
        "description": "Makes anvils.",
        "founded_year": 1949,
        "request_id": "clay-abc",
        "body": body,
    }


def test_fields_may_sit_in_a_nested_company_object() -> None:
    body = {
        "request_id": "clay-1",
        "company": {"name": "Beacon Foods", "employee_count": 146.0, "url": "beaconfoods.com.br"},
    }
    verdict = parse_clay_callback(TASK, body)
    assert isinstance(verdict, StepResult)
    assert verdict.result["company_name"] == "Beacon Foods"
    assert verdict.result["employee_count"] == 146
    assert verdict.result["website"] == "beaconfoods.com.br"


def test_values_that_are_not_what_a_column_holds_stay_in_the_body_only() -> None:
    body = {"employee_count": "201-500", "founded_year": True, "industry": ["a", "b"]}
    verdict = parse_clay_callback(TASK, body)
    assert isinstance(verdict, StepResult)
    assert verdict.result["employee_count"] is None
    assert verdict.result["founded_year"] is None
    assert verdict.result["industry"] is None
    assert verdict.result["body"] == body


def test_an_error_body_fails_the_row_terminally_unless_it_says_retryable() -> None:
    failed = parse_clay_callback(TASK, {"error": "No company found", "request_id": "clay-1"})
    assert failed == StepFailure(TASK, "Clay: No company found", retryable=False)
    again = parse_clay_callback(TASK, {"error": {"code": "provider_down"}, "retryable": True})
    assert again == StepFailure(TASK, 'Clay: {"code": "provider_down"}', retryable=True)
    # An empty error column (Clay sends the key with nothing in it) is no error.
    assert isinstance(parse_clay_callback(TASK, {"error": "", "domain": "a.io"}), StepResult)


# End to end: real callbacks through the real HTTP receiver --------------------------------------


def clay_answer(posted: dict[str, Any]) -> dict[str, Any]:
    """What the table's HTTP API column posts back, built from the row Clay received."""
    if posted["name"] == "Nobody Ltd":
        return {"request_id": posted["request_id"], "error": "No company found"}
    return {
        "request_id": posted["request_id"],
        "Company Name": posted["name"],
        "domain": posted["domain"],
        "linkedin_url": posted["linkedin_url"],
        "employee_count": 250,
        "industry": "Software",
        "country": "France",
        "enrich_company": {"followers": 1200},
    }


async def test_clay_callbacks_complete_rows_through_the_real_receiver(
    api: PgStateAPI, conn: Conn, clay_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The receiver here listens on 127.0.0.1, which the real Clay could not reach.
    await configure_step(conn, "clay_enrich", allow_local_callback=True)
    monkeypatch.setenv("ENRICH_CALLBACK_SECRET", "s" * 32)
    get_settings.cache_clear()
    items = [
        {"name": "Dune Networks", "website": "www.dunenetworks.fr/en-us/contact?utm=x"},
        {"name": "Nobody Ltd", "website": "nobody-ltd.co.uk"},
    ]
    batch_id = await api.create_batch(["normalize_domain", "clay_enrich"], items)
    await run_chunk(api, "normalize_domain", tasks(await api.claim(10, batch_ids=[batch_id])))
    posted: list[dict[str, Any]] = []

    def clay_webhook(request: httpx.Request) -> httpx.Response:
        posted.append(json.loads(request.content))
        return httpx.Response(200, json={"status": "queued"})

    try:
        with respx.mock(assert_all_called=True) as clay:
            clay.post(CLAY_URL).mock(side_effect=clay_webhook)
            clay.route(host="127.0.0.1").pass_through()  # the receiver is not Clay
            async with callback_receiver(api, get_settings(), port=0) as url:
                claimed = tasks(await api.claim(10, batch_ids=[batch_id]))
                report = await run_chunk(api, "clay_enrich", claimed, callback_url=url)
                assert report.submitted == 2
                answers = await post_callbacks(posted)
                replay = await post_callbacks(posted[:1])
    finally:
        get_settings.cache_clear()

    assert [a.json()["status"] for a in answers] == ["applied", "applied"]
    assert replay[0].json()["status"] == "already applied"
    by_name = {p["name"]: p for p in posted}
    assert by_name["Dune Networks"]["domain"] == "dunenetworks.fr"  # from normalize_domain
    assert all(p["callback_url"].startswith("http://127.0.0.1:") for p in posted)
    await check_rows(conn, batch_id, by_name)


async def post_callbacks(posted: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=10) as client:
        return [await client.post(p["callback_url"], json=clay_answer(p)) for p in posted]


async def check_rows(conn: Conn, batch_id: UUID, by_name: dict[str, dict[str, Any]]) -> None:
    rows = {r["raw_data"]["name"]: r for r in await states(conn, batch_id, "clay_enrich")}
    dune, nobody = rows["Dune Networks"], rows["Nobody Ltd"]
    assert (dune["status"], dune["attempt"]) == ("COMPLETED", 1)
    assert dune["meta"]["awaiting"]["request_id"] == by_name["Dune Networks"]["request_id"]
    # The error callback failed its row for good: a retry would bill Clay again.
    assert (nobody["status"], nobody["attempt"]) == ("FAILED", 1)
    assert nobody["meta"]["error"] == "Clay: No company found"
    [result] = await fetch(
        conn, "select * from clay_enrich_results where batch_id = %s", (batch_id,)
    )
    assert result["item_id"] == dune["item_id"]
    assert (result["company_name"], result["domain"], result["employee_count"]) == (
        "Dune Networks",
        "dunenetworks.fr",
        250,
    )
    assert (result["industry"], result["country"], result["linkedin_url"]) == (
        "Software",
        "France",
        None,
    )
    assert result["request_id"] == by_name["Dune Networks"]["request_id"]
    assert result["result"]["body"] == clay_answer(by_name["Dune Networks"])


# enrich run: the preflight, before anything is written ----------------------------------------


def enrich(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def counts(dsn: str) -> tuple[Any, ...]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "select (select count(*) from batches), (select count(*) from batch_items),"
            " (select count(*) from workflow_states where attempt > 0)"
        ).fetchone()
    assert row is not None
    return tuple(row)


def test_enrich_run_without_the_webhook_url_writes_nothing(
    db: str, no_clay_env: None, tmp_path: Path
) -> None:
    csv = tmp_path / "companies.csv"
    csv.write_text("Company Name,Website\nAcme Inc,acme.com\nBeta,beta.io\n", encoding="utf-8")

    result = enrich("run", str(csv), "--steps", "normalize_domain,clay_enrich")

    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ConfigurationError: step clay_enrich: ")
    assert "CLAY_WEBHOOK_URL is unset or empty" in lines[0]
    assert "Traceback" not in result.output and result.stdout == ""
    assert counts(db) == (0, 0, 0)


async def test_enrich_run_resuming_a_clay_batch_checks_first(
    db: str, api: PgStateAPI, no_clay_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch_id = await api.create_batch(["clay_enrich"], [{"name": "Acme"}])
    with pytest.raises(ConfigurationError, match=r"step clay_enrich: .*CLAY_WEBHOOK_URL"):
        await preflight(db, batch_id=batch_id)
    await preflight(db, ["normalize_domain", "no_such_step"])  # nothing to check: no error
    monkeypatch.setenv("CLAY_WEBHOOK_URL", CLAY_URL)
    await preflight(db, batch_id=batch_id)
    await preflight(db, ["normalize_domain", "clay_enrich"])
    assert counts(db) == (1, 1, 0)  # the preflight claimed nothing
