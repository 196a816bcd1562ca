"""``exa_verify`` (issue 8, item 1): one Exa search per company. respx plays Exa with the shapes
its documentation gives (shared/providers/exa.py names the sources): the search request, the 200
answer with ``requestId`` and ``costDollars``, and the error answers ``{"requestId", "error",
"tag"}`` for 401, 402, 403, 429 (with and without Retry-After) and 5xx, plus timeouts. The local
stand-in (shared/providers/exa_standin.py) serves a real ``enrich run``."""

from __future__ import annotations

import email.utils
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import httpx
import psycopg
import pytest
import respx
from click.testing import CliRunner, Result

from shared.cli.main import main
from shared.errors import ConfigurationError, RateLimited, RetryableError, TerminalError
from shared.pg_state import PgStateAPI
from shared.providers.exa import (
    DEFAULT_BASE_URL,
    check_exa_config,
    retry_after_seconds,
    search_body,
    settings_from_config,
)
from shared.providers.exa_standin import results_for, slug
from shared.state_api import Cost
from shared.steps import HANDLERS, PREFLIGHTS, StepContext
from shared.steps.exa_verify import exa_verify, registrable_domain
from shared.worker import run_chunk
from tests.contract import fetch, states, tasks

Conn = psycopg.AsyncConnection[Any]
REPO = Path(__file__).resolve().parents[1]

KEY = "exa-k3y-s3cret-0123456789"
SEARCH_URL = f"{DEFAULT_BASE_URL}/search"
ACME = {"name": "Acme Inc", "website": "https://www.acme.co.uk/about"}


@pytest.fixture
def exa_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXA_API_KEY", KEY)
    monkeypatch.delenv("EXA_BASE_URL", raising=False)


@pytest.fixture
def no_exa_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXA_API_KEY", raising=False)
    monkeypatch.delenv("EXA_BASE_URL", raising=False)


async def _beat() -> None:
    return None


class Charges(list[Cost]):
    def __call__(self, cost: Cost) -> None:
        self.append(cost)


def context(
    inputs: dict[str, dict[str, Any]] | None = None,
    charges: Charges | None = None,
    **config: Any,
) -> StepContext:
    return StepContext(
        batch_id=uuid4(),
        item_id=uuid4(),
        step_name="exa_verify",
        attempt=1,
        config={"cost_usd": 0.007, **config},
        heartbeat=_beat,
        inputs=inputs if inputs is not None else {},
        charge=charges if charges is not None else Charges(),
    )


def result(url: str, title: str, highlight: str | None = None, **extra: Any) -> dict[str, Any]:
    """One result as the search reference's example shows it."""
    found: dict[str, Any] = {
        "title": title,
        "url": url,
        "publishedDate": "2024-03-01T00:00:00.000Z",
        "author": None,
        "id": url,
        **extra,
    }
    if highlight is not None:
        found["highlights"] = [highlight]
        found["highlightScores"] = [0.42]
    return found


def answer(*results: dict[str, Any], total: float | None = 0.005) -> dict[str, Any]:
    body: dict[str, Any] = {
        "requestId": "b5947044c4b78efa9552a7c89b306d95",
        "resolvedSearchType": "neural",
        "results": list(results),
    }
    if total is not None:
        body["costDollars"] = {"total": total, "search": {"neural": total}}
    return body


def exa_error(status: int, error: str, tag: str, **headers: str) -> httpx.Response:
    body = {"requestId": "e492118ccdedcba5088bfc4357a8a125", "error": error, "tag": tag}
    return httpx.Response(status, json=body, headers=headers)


def assert_no_key(text: str) -> None:
    assert KEY not in text, text


# The registry wiring and the preflight ---------------------------------------------------------


def test_exa_verify_is_registered_with_its_preflight() -> None:
    assert HANDLERS["exa_verify"] is exa_verify
    assert PREFLIGHTS["exa_verify"] is check_exa_config


async def test_the_seeded_registry_row(conn: Conn) -> None:
    [row] = await fetch(
        conn,
        "select type::text, modal_function_name, results_table, config from enrichment_registry"
        " where step_name = 'exa_verify'",
    )
    assert (row["type"], row["modal_function_name"], row["results_table"]) == (
        "SYNC",
        "exa_verify",
        "exa_verify_results",
    )
    config = row["config"]
    assert config["needs"] == ["normalize_domain"]
    assert (config["provider"], config["api_key_env"], config["base_url_env"]) == (
        "exa",
        "EXA_API_KEY",
        "EXA_BASE_URL",
    )
    assert config["cost_usd"] > 0 and config["cache"]["ttl_seconds"] > 0
    assert config["skip_unless"] == ["normalize_domain.domain"]


def test_a_missing_key_names_the_variable(no_exa_env: None) -> None:
    with pytest.raises(ConfigurationError, match="EXA_API_KEY is unset or empty"):
        check_exa_config({})


def test_the_config_names_the_variables(monkeypatch: pytest.MonkeyPatch, no_exa_env: None) -> None:
    config = {"api_key_env": "EXA_TEAM_KEY", "base_url_env": "EXA_TEAM_URL"}
    with pytest.raises(ConfigurationError, match="EXA_TEAM_KEY"):
        check_exa_config(config)
    monkeypatch.setenv("EXA_TEAM_KEY", KEY)
    assert settings_from_config(config).base_url == DEFAULT_BASE_URL  # unset: Exa's own
    monkeypatch.setenv("EXA_TEAM_URL", "http://127.0.0.1:8788/")
    assert settings_from_config(config).base_url == "http://127.0.0.1:8788"
    monkeypatch.setenv("EXA_TEAM_URL", "127.0.0.1:8788")
    with pytest.raises(ConfigurationError, match="EXA_TEAM_URL does not hold an http"):
        check_exa_config(config)
    assert KEY not in repr(settings_from_config({**config, "base_url_env": "NOT_SET_HERE"}))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"api_key_env": 5}, "config.api_key_env must name"),
        ({"base_url_env": "not a name"}, "config.base_url_env must name"),
        ({"request_timeout_seconds": 0}, "request_timeout_seconds must be a number > 0"),
        ({"num_results": 0}, "num_results must be an integer >= 1"),
        ({"cost_usd": -1}, "cost_usd must be a number >= 0"),
        ({"category": 3}, "config.category must be a string"),
    ],
)
def test_bad_config_values(exa_env: None, config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        check_exa_config(config)


# The search Exa receives ---------------------------------------------------------------------


@respx.mock(assert_all_called=True)
async def test_a_name_search_with_the_key_in_its_header(
    respx_mock: respx.MockRouter, exa_env: None
) -> None:
    route = respx_mock.post(SEARCH_URL).mock(
        return_value=httpx.Response(200, json=answer(result("https://acme.com/", "Acme")))
    )
    ctx = context(inputs={"normalize_domain": {"domain": "acme.com"}}, num_results=3)

    found = await exa_verify(ACME, ctx)

    request = route.calls.last.request
    assert json.loads(request.content) == {
        "query": "Acme Inc official website",  # never the domain: that would find what it says
        "type": "auto",
        "numResults": 3,
        "contents": {"highlights": True},
        "category": "company",
    }
    assert request.headers["x-api-key"] == KEY
    assert request.headers["content-type"] == "application/json"
    assert found["domain"] == "acme.com"  # normalize_domain's, not the row's acme.co.uk
    assert (found["verified"], found["matched_url"]) == (True, "https://acme.com/")


@respx.mock
async def test_without_a_name_the_domain_is_searched(
    respx_mock: respx.MockRouter, exa_env: None
) -> None:
    route = respx_mock.post(SEARCH_URL).mock(
        return_value=httpx.Response(200, json=answer(result("https://www.acme.io/", "Acme")))
    )
    found = await exa_verify({"email": "jane@acme.io"}, context(category=""))
    body = json.loads(route.calls.last.request.content)
    assert body["query"] == "acme.io" and "category" not in body
    assert (found["verified"], found["confidence"]) == (True, 0.6)  # a domain search proves less


@respx.mock
async def test_an_item_without_a_domain_is_not_searched(
    respx_mock: respx.MockRouter, exa_env: None
) -> None:
    route = respx_mock.post(SEARCH_URL)
    with pytest.raises(TerminalError, match="nothing for Exa to verify"):
        await exa_verify({"name": "Acme"}, context())
    with pytest.raises(TerminalError, match="nothing for Exa to verify"):  # it ran, found none
        await exa_verify(ACME, context(inputs={"normalize_domain": {"domain": None}}))
    assert not route.called


# What the answer says ---------------------------------------------------------------------------


@respx.mock
async def test_a_verified_domain_with_its_evidence_request_id_and_cost(
    respx_mock: respx.MockRouter, exa_env: None
) -> None:
    respx_mock.post(SEARCH_URL).mock(
        return_value=httpx.Response(
            200,
            json=answer(
                result("https://www.linkedin.com/company/acme", "Acme | LinkedIn", "10k followers"),
                result(
                    "https://shop.acme.com/en/",
                    "Acme Inc - Anvils since 1949",
                    "  Acme makes\nanvils.  ",
                    score=0.87,
                ),
                total=0.012,
            ),
        )
    )
    charges = Charges()
    found = await exa_verify(ACME, context({"normalize_domain": {"domain": "acme.com"}}, charges))

    assert charges == [Cost("exa", 1, 0.012)]  # costDollars.total, charged once
    assert found == {
        "verified": True,
        "confidence": 0.85,  # second result
        "domain": "acme.com",
        "company_name": "Acme Inc",
        "query": "Acme Inc official website",
        "matched_url": "https://shop.acme.com/en/",
        "matched_rank": 2,
        "title": "Acme Inc - Anvils since 1949",
        "snippet": "Acme makes anvils.",
        "evidence_url": "https://shop.acme.com/en/",
        "top_url": "https://www.linkedin.com/company/acme",
        "top_domain": None,  # a LinkedIn page is no company's own site
        "request_id": "b5947044c4b78efa9552a7c89b306d95",
        "cost_usd": 0.012,
        "search_type": "neural",
        "results": [
            {
                "url": "https://www.linkedin.com/company/acme",
                "title": "Acme | LinkedIn",
                "domain": None,
            },
            {
                "url": "https://shop.acme.com/en/",
                "title": "Acme Inc - Anvils since 1949",
                "domain": "acme.com",
            },
        ],
    }


@respx.mock
async def test_an_unverified_domain_keeps_the_top_result_as_evidence(
    respx_mock: respx.MockRouter, exa_env: None
) -> None:
    respx_mock.post(SEARCH_URL).mock(
        return_value=httpx.Response(
            200,
            json=answer(
                result("https://acme-group.net/", "Acme Group", summary="A namesake."), total=None
            ),
        )
    )
    charges = Charges()
    found = await exa_verify(ACME, context({"normalize_domain": {"domain": "acme.com"}}, charges))
    assert charges == [Cost("exa", 1, 0.007)]  # no costDollars: the config's cost
    assert (found["verified"], found["confidence"], found["matched_url"]) == (False, 0.0, None)
    assert (found["title"], found["snippet"], found["top_domain"]) == (
        "Acme Group",
        "A namesake.",
        "acme-group.net",
    )


@respx.mock
async def test_no_results_at_all(respx_mock: respx.MockRouter, exa_env: None) -> None:
    respx_mock.post(SEARCH_URL).mock(return_value=httpx.Response(200, json=answer()))
    found = await exa_verify(ACME, context({"normalize_domain": {"domain": "acme.com"}}))
    assert (found["verified"], found["confidence"], found["top_url"], found["results"]) == (
        False,
        0.0,
        None,
        [],
    )


def test_registrable_domains_of_result_urls() -> None:
    assert registrable_domain("https://WWW.Acme.co.uk/about?x=1") == "acme.co.uk"
    assert registrable_domain("https://acme.github.io/") == "acme.github.io"
    assert registrable_domain("https://www.linkedin.com/company/acme") is None
    assert registrable_domain("http://10.0.0.1/") is None


# Exa's errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "error", "words"),
    [
        (exa_error(401, f"Invalid API key {KEY}", "INVALID_API_KEY"), TerminalError, "EXA_API_KEY"),
        (exa_error(403, "Feature not enabled", "ACCESS_DENIED"), TerminalError, "HTTP 403"),
        (exa_error(402, "No more credits", "NO_MORE_CREDITS"), TerminalError, "top up"),
        (exa_error(400, "query is required", "INVALID_REQUEST_BODY"), TerminalError, "HTTP 400"),
        (exa_error(422, "could not process", "UNPROCESSABLE"), TerminalError, "HTTP 422"),
        (exa_error(500, "Internal error", "INTERNAL_ERROR"), RetryableError, "HTTP 500"),
        (httpx.Response(502, text="<html>Bad Gateway</html>"), RetryableError, "HTTP 502"),
        (exa_error(503, "Overloaded", "SERVICE_OVERLOADED"), RetryableError, "HTTP 503"),
        (httpx.Response(504), RetryableError, "HTTP 504"),
        (httpx.Response(408), RetryableError, "HTTP 408"),
    ],
)
@respx.mock
async def test_http_errors(
    respx_mock: respx.MockRouter,
    exa_env: None,
    response: httpx.Response,
    error: type[Exception],
    words: str,
) -> None:
    respx_mock.post(SEARCH_URL).mock(return_value=response)
    charges = Charges()
    with pytest.raises(error, match=words) as raised:
        await exa_verify(ACME, context(charges=charges))
    assert not isinstance(raised.value, RateLimited)
    assert_no_key(str(raised.value))
    assert charges == []  # an error answer is not billed


@respx.mock
async def test_a_401_says_what_to_check_and_carries_exas_tag(
    respx_mock: respx.MockRouter, exa_env: None
) -> None:
    respx_mock.post(SEARCH_URL).mock(
        return_value=exa_error(401, f"Invalid API key: {KEY}", "INVALID_API_KEY")
    )
    with pytest.raises(TerminalError) as raised:
        await exa_verify(ACME, context())
    assert str(raised.value) == (
        "Exa refused the API key (HTTP 401: Invalid API key: *** [INVALID_API_KEY]): check the "
        "key in EXA_API_KEY and its team's plan at https://dashboard.exa.ai"
    )


@respx.mock
async def test_a_429_with_retry_after_seconds(respx_mock: respx.MockRouter, exa_env: None) -> None:
    respx_mock.post(SEARCH_URL).mock(
        return_value=exa_error(
            429, "rate limit exceeded", "RATE_LIMIT_EXCEEDED", **{"Retry-After": "3"}
        )
    )
    with pytest.raises(RateLimited, match="HTTP 429") as raised:
        await exa_verify(ACME, context())
    assert (raised.value.provider, raised.value.retry_after) == ("exa", 3.0)
    assert isinstance(raised.value, RetryableError)


@respx.mock
async def test_a_429_with_an_http_date_or_without_retry_after(
    respx_mock: respx.MockRouter, exa_env: None
) -> None:
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    route = respx_mock.post(SEARCH_URL)
    route.side_effect = [
        httpx.Response(429, headers={"Retry-After": later}, json={"error": "slow down"}),
        httpx.Response(429, json={"error": "rate limit exceeded"}),
    ]
    with pytest.raises(RateLimited) as dated:
        await exa_verify(ACME, context())
    assert dated.value.retry_after is not None and 25 <= dated.value.retry_after <= 31
    with pytest.raises(RateLimited) as bare:
        await exa_verify(ACME, context())
    assert bare.value.retry_after is None  # the step's backoff decides


def test_retry_after_values() -> None:
    now = 1_000_000.0
    assert retry_after_seconds("120") == 120.0
    assert retry_after_seconds(" 0.5 ") == 0.5
    assert retry_after_seconds("-4") == 0.0
    assert retry_after_seconds(email.utils.formatdate(now + 7, usegmt=True), now) == 7.0
    assert retry_after_seconds(email.utils.formatdate(now - 7, usegmt=True), now) == 0.0
    for unreadable in (None, "", "soon", "nan", "inf"):
        assert retry_after_seconds(unreadable) is None


@pytest.mark.parametrize(
    "failure",
    [
        httpx.ConnectTimeout("timed out"),
        httpx.ReadTimeout("timed out"),
        httpx.ConnectError("cannot connect to api.exa.ai"),
        httpx.RemoteProtocolError("server disconnected"),
    ],
)
@respx.mock
async def test_network_failures_are_retryable(
    respx_mock: respx.MockRouter, exa_env: None, failure: Exception
) -> None:
    respx_mock.post(SEARCH_URL).mock(side_effect=failure)
    with pytest.raises(RetryableError, match=type(failure).__name__) as raised:
        await exa_verify(ACME, context())
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


@respx.mock
async def test_an_unreadable_200_is_retried_but_was_billed(
    respx_mock: respx.MockRouter, exa_env: None
) -> None:
    respx_mock.post(SEARCH_URL).mock(return_value=httpx.Response(200, text="<html>oops</html>"))
    charges = Charges()
    with pytest.raises(RetryableError, match="without a results list"):
        await exa_verify(ACME, context(charges=charges))
    assert charges == [Cost("exa", 1, 0.007)]


def test_the_search_body_follows_the_config(exa_env: None) -> None:
    settings = settings_from_config({"search_type": "fast", "num_results": 10, "category": ""})
    assert search_body(settings, "q") == {
        "query": "q",
        "type": "fast",
        "numResults": 10,
        "contents": {"highlights": True},
    }


# Through the worker into exa_verify_results -------------------------------------------------------


async def test_the_worker_writes_typed_results(api: PgStateAPI, conn: Conn, exa_env: None) -> None:
    items = [
        {"name": "Dune Networks", "website": "www.dunenetworks.fr/en-us/contact?utm=x"},
        {"name": "Oak Networks", "website": "http://oaknetworks.in/"},
    ]
    batch_id = await api.create_batch(["normalize_domain", "exa_verify"], items)
    await run_chunk(api, "normalize_domain", tasks(await api.claim(10, batch_ids=[batch_id])))

    def exa(request: httpx.Request) -> httpx.Response:
        query = json.loads(request.content)["query"]
        url = "https://www.dunenetworks.fr/" if query.startswith("Dune") else "https://oak.net/"
        return httpx.Response(200, json=answer(result(url, query, "Home page"), total=0.007))

    with respx.mock:
        respx.post(SEARCH_URL).mock(side_effect=exa)
        claimed = tasks(await api.claim(10, batch_ids=[batch_id]))
        report = await run_chunk(api, "exa_verify", claimed)
    assert report.completed == 2

    rows = {
        r["company_name"]: r
        for r in await fetch(
            conn, "select * from exa_verify_results where batch_id = %s", (batch_id,)
        )
    }
    dune, oak = rows["Dune Networks"], rows["Oak Networks"]
    assert (dune["verified"], float(dune["confidence"]), dune["domain"]) == (
        True,
        0.95,
        "dunenetworks.fr",
    )
    assert (dune["matched_url"], dune["title"], dune["snippet"]) == (
        "https://www.dunenetworks.fr/",
        "Dune Networks official website",
        "Home page",
    )
    assert (dune["request_id"], float(dune["cost_usd"])) == (
        "b5947044c4b78efa9552a7c89b306d95",
        0.007,
    )
    assert (oak["verified"], float(oak["confidence"]), oak["top_domain"]) == (False, 0.0, "oak.net")
    assert {s["status"] for s in await states(conn, batch_id)} == {"COMPLETED"}


# The stand-in ---------------------------------------------------------------------------------


def test_the_standin_answers_deterministically() -> None:
    first = results_for("Acme Inc official website", 5, {})
    assert first == results_for("Acme Inc official website", 5, {})
    assert len(first) == 4 and len(results_for("Acme Inc official website", 2, {})) == 2
    assert slug("Beacon Foods, Ltda.") == "beaconfoods"
    known = results_for(
        "Beacon Foods, Ltda. official website", 5, {"beacon foods, ltda.": "beaconfoods.com.br"}
    )
    assert any(r["url"] == "https://www.beaconfoods.com.br/" for r in known)
    assert results_for("acme.io", 1, {})[0]["url"] == "https://www.acme.io/"


@pytest.fixture
def standin() -> Iterator[str]:
    """The stand-in as its own process on a free port; its base URL."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared.providers.exa_standin",
            "--port",
            "0",
            "--latency-ms",
            "5",
            "--api-key",
            KEY,
            "--companies",
            str(REPO / "examples" / "companies.csv"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # printed once it listens
        yield str(json.loads(line)["exa_standin"])
    finally:
        process.terminate()
        process.wait(timeout=10)


def stats(base_url: str) -> dict[str, int]:
    return dict(httpx.get(f"{base_url}/stats", timeout=5).json())


async def test_the_standin_checks_the_key_and_limits_the_rate(standin: str) -> None:
    async with httpx.AsyncClient(base_url=standin, timeout=5) as client:
        missing = await client.post("/search", json={"query": "acme.com"})
        wrong = await client.post(
            "/search", json={"query": "acme.com"}, headers={"x-api-key": "no"}
        )
        bearer = await client.post(
            "/search", json={"query": "acme.com"}, headers={"authorization": f"Bearer {KEY}"}
        )
    assert (missing.status_code, wrong.status_code, bearer.status_code) == (401, 401, 200)
    assert set(missing.json()) == {"requestId", "error", "tag"}
    body = bearer.json()
    assert len(body["requestId"]) == 32 and body["costDollars"]["total"] == 0.007
    assert stats(standin) == {"searches": 1, "rate_limited": 0, "unauthorized": 2, "invalid": 0}


def test_a_rate_limited_standin_sends_retry_after() -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared.providers.exa_standin",
            "--port",
            "0",
            "--latency-ms",
            "0",
            "--limit-rps",
            "2",
            "--retry-after",
            "4",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        url = json.loads(process.stdout.readline())["exa_standin"]
        with httpx.Client(base_url=url, headers={"x-api-key": "k"}, timeout=5) as client:
            answers = [client.post("/search", json={"query": "acme.com"}) for _ in range(4)]
    finally:
        process.terminate()
        process.wait(timeout=10)
    codes = [a.status_code for a in answers]
    assert codes.count(200) == 2 and codes.count(429) == 2, codes
    limited = next(a for a in answers if a.status_code == 429)
    assert limited.headers["retry-after"] == "4"
    assert retry_after_seconds(limited.headers["retry-after"]) == 4.0


# enrich run: the preflight, and the stand-in end to end ------------------------------------------


def enrich(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def counts(dsn: str) -> tuple[Any, ...]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "select (select count(*) from batches), (select count(*) from batch_items)"
        ).fetchone()
    assert row is not None
    return tuple(row)


def test_enrich_run_without_the_key_writes_nothing(
    db: str, no_exa_env: None, tmp_path: Path
) -> None:
    csv = tmp_path / "companies.csv"
    csv.write_text("Company Name,Website\nAcme Inc,acme.com\n", encoding="utf-8")
    result = enrich("run", str(csv), "--steps", "normalize_domain,exa_verify")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ConfigurationError: step exa_verify: ")
    assert "EXA_API_KEY is unset or empty" in lines[0]
    assert counts(db) == (0, 0)


def test_enrich_run_against_the_standin(
    db: str, standin: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("EXA_API_KEY", KEY)
    monkeypatch.setenv("EXA_BASE_URL", standin)
    rows = (REPO / "examples" / "companies.csv").read_text(encoding="utf-8").splitlines()[:21]
    csv = tmp_path / "companies.csv"
    csv.write_text("\n".join(rows) + "\n", encoding="utf-8")

    result = enrich("run", str(csv), "--steps", "normalize_domain,exa_verify")

    assert result.exit_code in (0, 3), result.output
    with psycopg.connect(db) as conn:
        verdicts = conn.execute(
            "select count(*), count(*) filter (where verified), count(request_id)"
            " from exa_verify_results"
        ).fetchone()
        reached = conn.execute(
            "select count(*) from workflow_states where step_name = 'exa_verify'"
        ).fetchone()
    assert verdicts is not None and reached is not None
    assert verdicts[0] == reached[0] > 0  # every item that reached exa_verify was verified
    assert verdicts[1] >= verdicts[0] * 0.6  # the stand-in knows the real sites of this file
    assert verdicts[2] == verdicts[0]
    assert stats(standin)["searches"] == reached[0]
    assert os.environ["EXA_BASE_URL"] == standin
