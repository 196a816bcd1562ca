"""Exa: web search, called once per item to find a company's official site.

What Exa documents, and where (checked for this module):

- https://exa.ai/docs/reference/search (and its OpenAPI source, https://exa.ai/docs/exa-spec.yaml,
  which the docs call "the source of truth for request and response schemas"): ``POST
  https://api.exa.ai/search`` with a JSON body: ``query``, ``type`` (``auto`` by default; also
  ``neural``, ``fast``, ``instant``, deep variants), ``category`` (``company``: "improved quality
  for finding ... company pages"; the company category supports only a limited set of filters, so
  none are sent), ``numResults`` (default 10) and ``contents`` (``{"highlights": true}`` returns
  query-relevant excerpts). The key goes in the ``x-api-key`` header (or ``Authorization: Bearer``).
  The 200 answer: ``requestId``, ``resolvedSearchType``, ``results`` (each ``url``, ``title``,
  ``id``, ``publishedDate``, ``author``, ``score``, ``highlights``, ``highlightScores``, ``text``,
  ``summary``; most optional) and ``costDollars`` (``total``, with a breakdown under ``search``
  and ``contents``; exa-py's ``CostDollars`` and exa-js's type have the same shape).
- https://exa.ai/docs/admin/error-codes (and /docs/reference/error-codes): errors are standard
  HTTP statuses with a JSON body ``{"requestId", "error", "tag"}``; "branch on the HTTP status
  code first and treat unrecognized tags as additional detail". 401 missing or invalid key; 402
  credits exhausted or the key's budget reached; 403 key valid but feature or content not allowed;
  429 rate limit exceeded ("implement exponential backoff"); 500/502/503/504 server side, retry.
- https://exa.ai/docs/reference/rate-limits: ``/search`` defaults to 10 QPS per team (all its
  keys together; https://exa.ai/docs/admin/billing), more on an Enterprise plan. The shared
  limit lives in the ``providers`` table, not here.
- https://exa.ai/docs/reference/pricing: Search is $7 per 1,000 requests, up to 10 results
  included; the registry's ``cost_usd`` (0.007) is what a call is recorded at when an answer
  carries no ``costDollars``.

Where the docs are silent, and what this module does then:

- Whether a 429 carries ``Retry-After``: not said. When it does (seconds or an HTTP date) its
  value is passed on in ``RateLimited.retry_after``; else None, and the database's backoff decides.
- Which answers are billed: the pricing page bills per request and says nothing of failed ones.
  A 200 is treated as billed (``charge`` is called before the answer is parsed: a 200 we cannot
  read still cost money); errors are not.
- 408 (request timeout) is retried like a timeout of our own; any other 4xx is terminal.

The SDK or plain httpx: plain httpx. exa-py's ``AsyncExa`` turns every non-200 answer into a bare
``ValueError("Request failed with status code ...")``, so a 429's ``Retry-After``, the status code
and Exa's ``tag`` would have to be parsed back out of a message; its ``SearchResponse`` keeps
``costDollars`` but not ``requestId``; it pulls ``requests`` and more into every worker image; and
its client is built per ``AsyncExa`` with a 600 s timeout. One POST with httpx keeps the status,
headers and body, the connection pool per event loop (as ``shared.providers.clay`` does), our own
timeouts, and respx can play Exa's documented answers in tests.

Registry config read here: ``api_key_env`` (default ``EXA_API_KEY``), ``base_url_env`` (default
``EXA_BASE_URL``; unset means https://api.exa.ai), ``request_timeout_seconds`` (10),
``num_results`` (5), ``search_type`` (``auto``), ``category`` (``company``; "" sends none) and
``cost_usd`` (0.007). The key lives in the environment (on Modal, a secret), never in the
database, a message or a log line.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import re
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from shared.errors import ConfigurationError, RateLimited, RetryableError, TerminalError
from shared.settings import require_https
from shared.state_api import Cost

PROVIDER = "exa"
DEFAULT_BASE_URL = "https://api.exa.ai"
DEFAULT_KEY_ENV = "EXA_API_KEY"
DEFAULT_BASE_URL_ENV = "EXA_BASE_URL"
SEARCH_PATH = "/search"
KEY_HEADER = "x-api-key"
DEFAULT_REQUEST_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_NUM_RESULTS = 5
DEFAULT_SEARCH_TYPE = "auto"
DEFAULT_CATEGORY = "company"
DEFAULT_COST_USD = 0.007  # https://exa.ai/docs/reference/pricing: $7 / 1k search requests
# Searches in flight at once per process (event loop); more wait their turn (the step's timeout
# bounds that). The shared rate limit is the database's; this bounds sockets and CPU. httpcore's
# pool does work quadratic in its connections and queued requests for every request (one pool of
# 64 connections with a few hundred searches queued behind a burst: ~7 ms of CPU per search,
# cProfile of bench/providers.py), so the connections are spread over small pools (clients of
# POOL_SIZE connections each), and a search first takes a free slot of one of them, waiting on an
# asyncio queue, never in a pool. 16 at Exa's latency (0.2 to 1 s) is 16 to 80 searches/s per
# process, above Exa's default 10 QPS; at the stand-in's 50 ms, up to 320/s.
CONNECTIONS = 16
POOL_SIZE = 4
RETRYABLE_STATUS = frozenset({408})
SNIPPET_CHARS = 300
USER_AGENT = "enrich-orchestrator (exa_verify)"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ExaSettings:
    """Where and how to search; the key is a credential, kept out of ``repr``."""

    api_key: str = field(repr=False)
    base_url: str
    key_env: str
    base_url_env: str
    timeout: float
    num_results: int
    search_type: str
    category: str | None
    cost_usd: float

    def hide(self, text: str) -> str:
        """``text`` with the key masked (an answer may echo what it was sent)."""
        return text.replace(self.api_key, "***") if self.api_key else text


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result, as much of it as the step uses."""

    url: str
    title: str | None
    snippet: str | None
    score: float | None


@dataclass(frozen=True, slots=True)
class SearchAnswer:
    request_id: str | None
    cost_usd: float  # costDollars.total, else the configured cost
    search_type: str | None
    hits: tuple[Hit, ...]


def _env_name(config: Mapping[str, Any], key: str, default: str) -> str:
    name = config.get(key, default)
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise ConfigurationError(
            f"config.{key} must name an environment variable (e.g. {default!r}), got {name!r}"
        )
    return name


def _number(config: Mapping[str, Any], key: str, default: float, *, minimum: float = 0) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= minimum:
        raise ConfigurationError(f"config.{key} must be a number > {minimum:g}, got {value!r}")
    return float(value)


def _text_option(config: Mapping[str, Any], key: str, default: str) -> str:
    value = config.get(key, default)
    if not isinstance(value, str):
        raise ConfigurationError(f"config.{key} must be a string, got {value!r}")
    return value.strip()


def _api_key(name: str) -> str:
    key = os.environ.get(name, "").strip()
    if not key:
        raise ConfigurationError(
            f"the Exa API key is missing: the environment variable {name} is unset or empty "
            "(create a key at https://dashboard.exa.ai/api-keys; on Modal, put it in the Exa "
            "secret)"
        )
    return key


def _base_url(name: str) -> str:
    url = os.environ.get(name, "").strip() or DEFAULT_BASE_URL
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("https", "http") and bool(parts.hostname)
    except ValueError:  # a malformed IPv6 host, say
        valid = False
    if not valid:
        raise ConfigurationError(f"the environment variable {name} does not hold an http(s) URL")
    # The API key rides in a header of every request: https, or http to this machine (stand-in).
    return require_https(url, f"the environment variable {name}").rstrip("/")


def settings_from_config(config: Mapping[str, Any]) -> ExaSettings:
    """The search the step's registry config describes, with the key from the environment.
    Raises ``ConfigurationError`` naming what is missing (never a value)."""
    key_env = _env_name(config, "api_key_env", DEFAULT_KEY_ENV)
    base_url_env = _env_name(config, "base_url_env", DEFAULT_BASE_URL_ENV)
    num_results = config.get("num_results", DEFAULT_NUM_RESULTS)
    if isinstance(num_results, bool) or not isinstance(num_results, int) or num_results < 1:
        raise ConfigurationError(f"config.num_results must be an integer >= 1, got {num_results!r}")
    search_type = _text_option(config, "search_type", DEFAULT_SEARCH_TYPE) or DEFAULT_SEARCH_TYPE
    category = _text_option(config, "category", DEFAULT_CATEGORY) or None
    cost = config.get("cost_usd", DEFAULT_COST_USD)
    if isinstance(cost, bool) or not isinstance(cost, int | float) or cost < 0:
        raise ConfigurationError(f"config.cost_usd must be a number >= 0, got {cost!r}")
    return ExaSettings(
        api_key=_api_key(key_env),
        base_url=_base_url(base_url_env),
        key_env=key_env,
        base_url_env=base_url_env,
        timeout=_number(config, "request_timeout_seconds", DEFAULT_REQUEST_TIMEOUT_SECONDS),
        num_results=num_results,
        search_type=search_type,
        category=category,
        cost_usd=float(cost),
    )


def check_exa_config(config: Mapping[str, Any]) -> None:
    """The preflight of a batch with an Exa step: the same checks a search makes, before anything
    is imported, so a missing key is one clear error rather than a failed row per item."""
    settings_from_config(config)


# Per event loop (connections belong to the loop that opened them), as for Clay: the free slots,
# each naming the client it belongs to (POOL_SIZE slots per client).
_slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Queue[httpx.AsyncClient]] = (
    weakref.WeakKeyDictionary()
)


def _free_slots() -> asyncio.Queue[httpx.AsyncClient]:
    loop = asyncio.get_running_loop()
    slots = _slots.get(loop)
    if slots is None:
        slots = asyncio.Queue()
        limits = httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)
        for _ in range(max(1, CONNECTIONS // POOL_SIZE)):
            client = httpx.AsyncClient(limits=limits, follow_redirects=False)
            for _ in range(POOL_SIZE):
                slots.put_nowait(client)
        _slots[loop] = slots
    return slots


def search_body(settings: ExaSettings, query: str) -> dict[str, Any]:
    """The JSON body of one search (camelCase, as the HTTP API takes it)."""
    body: dict[str, Any] = {
        "query": query,
        "type": settings.search_type,
        "numResults": settings.num_results,
        "contents": {"highlights": True},
    }
    if settings.category:
        body["category"] = settings.category
    return body


async def search(
    config: Mapping[str, Any], query: str, charge: Callable[[Cost], None]
) -> SearchAnswer:
    """One ``POST /search``. ``charge`` is called as soon as Exa answered 200 (the call is billed),
    before the answer is read. Raises ``RateLimited`` (429), ``RetryableError`` (5xx, 408,
    timeouts, network, an unreadable 200) or ``TerminalError`` (the key, the request)."""
    settings = settings_from_config(config)
    response = await _post(settings, search_body(settings, query))
    _check_status(response, settings)
    data = _json(response)
    cost = _cost(data, settings.cost_usd)
    charge(Cost(PROVIDER, 1, cost))
    if not isinstance(data, Mapping) or not isinstance(data.get("results"), list):
        raise RetryableError(
            f"Exa answered 200 without a results list ({_detail(response, settings) or 'empty'})"
        )
    return SearchAnswer(
        request_id=_str(data.get("requestId")),
        cost_usd=cost,
        search_type=_str(data.get("resolvedSearchType")) or _str(data.get("searchType")),
        hits=tuple(hit for raw in data["results"] if (hit := _hit(raw)) is not None),
    )


async def _post(settings: ExaSettings, body: Mapping[str, Any]) -> httpx.Response:
    headers = {KEY_HEADER: settings.api_key, "user-agent": USER_AGENT}
    timeout = httpx.Timeout(settings.timeout, connect=CONNECT_TIMEOUT_SECONDS, pool=None)
    url = settings.base_url + SEARCH_PATH
    # Messages name the exception's type only; the key is in a header httpx never prints.
    slots = _free_slots()
    client = await slots.get()
    try:
        return await client.post(url, json=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException as exc:
        raise RetryableError(
            f"Exa did not answer within {settings.timeout:g}s ({type(exc).__name__})"
        ) from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL):
        raise ConfigurationError(
            f"{settings.base_url_env} is not a URL httpx can post to"
        ) from None
    except httpx.TransportError as exc:
        raise RetryableError(f"could not reach Exa ({type(exc).__name__})") from None
    finally:
        slots.put_nowait(client)


def _check_status(response: httpx.Response, settings: ExaSettings) -> None:
    status = response.status_code
    if status == 200:
        return
    detail = _detail(response, settings)
    if status == 429:
        raise RateLimited(
            f"Exa's rate limit was exceeded (HTTP 429{detail})",
            provider=PROVIDER,
            retry_after=retry_after_seconds(response.headers.get("retry-after")),
        )
    if status >= 500 or status in RETRYABLE_STATUS:
        raise RetryableError(f"Exa answered HTTP {status}{detail}")
    if status in (401, 403):
        what = "refused the API key" if status == 401 else "refused the request for this key"
        raise TerminalError(
            f"Exa {what} (HTTP {status}{detail}): check the key in {settings.key_env} and its "
            "team's plan at https://dashboard.exa.ai"
        )
    if status == 402:
        raise TerminalError(
            f"Exa refused to bill the search (HTTP 402{detail}): the team's credits or the key's "
            "budget are used up; top up at https://dashboard.exa.ai, then enrich retry"
        )
    raise TerminalError(f"Exa refused the search (HTTP {status}{detail})")


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header as seconds from now: delay-seconds or an HTTP date (RFC 9110);
    None when absent or unreadable."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN, inf
        return None
    return max(0.0, seconds)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except (ValueError, UnicodeDecodeError):
        return None


def _detail(response: httpx.Response, settings: ExaSettings, limit: int = 200) -> str:
    """``: <error> [<tag>]`` from Exa's error body (or its text), short, with the key masked."""
    data = _json(response)
    if isinstance(data, Mapping) and ("error" in data or "tag" in data):
        tag = data.get("tag")
        text = " ".join(p for p in (str(data.get("error") or ""), f"[{tag}]" if tag else "") if p)
    else:
        text = response.text
    text = settings.hide(" ".join(text.split()))
    if not text:
        return ""
    return f": {text[:limit]}{'...' if len(text) > limit else ''}"


def _cost(data: Any, default: float) -> float:
    cost = data.get("costDollars") if isinstance(data, Mapping) else None
    total = _float(cost.get("total")) if isinstance(cost, Mapping) else None
    return total if total is not None and total >= 0 else default


def _str(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _hit(raw: Any) -> Hit | None:
    if not isinstance(raw, Mapping):
        return None
    url = _str(raw.get("url"))
    if url is None:
        return None
    score = raw.get("score")
    return Hit(
        url=url,
        title=_str(raw.get("title")),
        snippet=_snippet(raw),
        score=_float(score),
    )


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _snippet(raw: Mapping[str, Any]) -> str | None:
    """The first highlight, else the summary, else the start of the text; one line, short."""
    highlights = raw.get("highlights")
    candidates: list[Any] = [highlights[0]] if isinstance(highlights, list) and highlights else []
    candidates += [raw.get("summary"), raw.get("text")]
    for candidate in candidates:
        if isinstance(candidate, str) and (text := " ".join(candidate.split())):
            return text if len(text) <= SNIPPET_CHARS else text[: SNIPPET_CHARS - 3] + "..."
    return None


__all__ = [
    "DEFAULT_BASE_URL",
    "PROVIDER",
    "ExaSettings",
    "Hit",
    "SearchAnswer",
    "check_exa_config",
    "retry_after_seconds",
    "search",
    "search_body",
    "settings_from_config",
]
