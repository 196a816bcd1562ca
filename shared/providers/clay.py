"""Clay: hand one row to a Clay table through the table's webhook; Clay answers later.

What Clay documents, and where (checked for this module):

- https://university.clay.com/docs/webhook-integration-guide (Clay University, "Webhooks in
  Clay"): a table's webhook source receives HTTP POST requests with a JSON body, one row per
  request; an authentication token is *optional* ("to secure your webhook, you can include an
  authentication token in the header of your request"), shown once when created; a webhook source
  takes 50,000 submissions in all, a limit that stays even after rows are deleted (then a new
  webhook is needed; Enterprise "auto-delete" / passthrough tables lift it).
- https://university.clay.com/docs/http-api-integration-overview ("HTTP API"): the HTTP API
  enrichment column sends one request per row with the method, URL, headers and JSON body the
  table's owner configures from column references. So the body of the callback Clay posts back is
  whatever the owner writes: ``shared.steps.clay_enrich`` documents the shape it reads.
- The header's name is not on Clay's page. ``x-clay-webhook-auth`` is what integrations that post
  to Clay webhooks send: https://docs.sim.ai/integrations/clay (optional token, "most webhooks do
  not require this"), https://docs.modulex.dev/integrations/tools/clay ("sent in the
  x-clay-webhook-auth header"); the activepieces and PostHog Clay clients do the same.
- Webhook URLs look like ``https://api.clay.com/v3/sources/webhook/pull-in-data-from-a-webhook-
  <id>`` (https://www.val.town/x/valdottown/Enrich-New-User, a Clay-as-an-API example with a
  callback column): the id is the only secret in it, so the URL is a credential, like the token.

Where the docs are silent, and what this module does then:

- Clay documents neither the webhook's answer (status codes, body) nor a request rate limit.
  2xx is accepted; a request id is taken from a JSON answer that carries one (``request_id``,
  ``id`` or ``record_id``), else the one we generated and sent along in the row is used. 408, 425,
  429 and 5xx, timeouts and network errors are retryable (the database backs off; nothing here
  sleeps); 401/403 (token), 404 (webhook gone) and any other answer are terminal, with a message
  that names the variables to check, never their values.
- Whether a token is required: the docs say optional, so it is sent when its variable is set and
  only required when ``config.auth_token_required`` is true.

Registry config read here: ``webhook_url_env`` (default ``CLAY_WEBHOOK_URL``), ``auth_token_env``
(default ``CLAY_WEBHOOK_TOKEN``), ``auth_token_required`` (default false) and
``request_timeout_seconds`` (default 10). The URL and token live in the environment (on Modal, a
secret), never in the database.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from shared.errors import ConfigurationError, RetryableError, TerminalError
from shared.settings import require_https

DEFAULT_URL_ENV = "CLAY_WEBHOOK_URL"
DEFAULT_TOKEN_ENV = "CLAY_WEBHOOK_TOKEN"
AUTH_HEADER = "x-clay-webhook-auth"
DEFAULT_REQUEST_TIMEOUT_SECONDS = 10.0
CONNECT_TIMEOUT_SECONDS = 5.0
# Rows posted at once per process; more wait for a connection (the step's timeout bounds that).
CONNECTIONS = 20
RETRYABLE_STATUS = frozenset({408, 425, 429})
REQUEST_ID_KEYS = ("request_id", "id", "record_id")
SUBMISSION_LIMIT = 50_000
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class ClayWebhook:
    """Where and how to post: the URL and token are credentials, kept out of ``repr``."""

    url: str = field(repr=False)
    token: str | None = field(repr=False)
    url_env: str
    token_env: str
    timeout: float

    def hide(self, text: str) -> str:
        """``text`` with the URL and token masked (an answer from Clay may echo them)."""
        for secret in (self.url, self.token):
            if secret:
                text = text.replace(secret, "***")
        return text


def _env_name(config: Mapping[str, Any], key: str, default: str) -> str:
    name = config.get(key, default)
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise ConfigurationError(
            f"config.{key} must name an environment variable (e.g. {default!r}), got {name!r}"
        )
    return name


def _timeout(config: Mapping[str, Any]) -> float:
    value = config.get("request_timeout_seconds", DEFAULT_REQUEST_TIMEOUT_SECONDS)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigurationError(
            f"config.request_timeout_seconds must be a number > 0, got {value!r}"
        )
    return float(value)


def _webhook_url(name: str) -> str:
    url = os.environ.get(name, "").strip()
    if not url:
        raise ConfigurationError(
            f"the Clay table's webhook URL is missing: the environment variable {name} is unset "
            "or empty (copy the URL from the table's webhook source in Clay; on Modal, put it in "
            "the Clay secret)"
        )
    try:
        parts = urlsplit(url)
        valid = parts.scheme in ("https", "http") and bool(parts.hostname)
    except ValueError:  # a malformed IPv6 host, say
        valid = False
    if not valid:  # never the value: the URL is a credential
        raise ConfigurationError(f"the environment variable {name} does not hold an http(s) URL")
    # The URL is the credential (and the token rides with it): https, or http to this machine.
    return require_https(url, f"the environment variable {name}")


def _token(name: str, required: bool) -> str | None:
    token = os.environ.get(name, "").strip() or None
    if token is None and required:
        raise ConfigurationError(
            f"the Clay webhook's auth token is missing: the environment variable {name} is unset "
            "or empty, and config.auth_token_required is true"
        )
    return token


def webhook_from_config(config: Mapping[str, Any]) -> ClayWebhook:
    """The webhook the step's registry config names, read from the environment.
    Raises ``ConfigurationError`` naming what is missing (never a value)."""
    url_env = _env_name(config, "webhook_url_env", DEFAULT_URL_ENV)
    token_env = _env_name(config, "auth_token_env", DEFAULT_TOKEN_ENV)
    required = config.get("auth_token_required", False)
    if not isinstance(required, bool):
        raise ConfigurationError(
            f"config.auth_token_required must be true or false, got {required!r}"
        )
    return ClayWebhook(
        _webhook_url(url_env), _token(token_env, required), url_env, token_env, _timeout(config)
    )


def check_clay_config(config: Mapping[str, Any]) -> None:
    """The preflight of a batch with a Clay step: the same checks a submission makes, before
    anything is imported, so a missing URL is one clear error rather than a failed row per item."""
    webhook_from_config(config)


class _HideWebhookUrls(logging.Filter):
    """httpx logs each request at INFO as ``HTTP Request: POST <url> ...``; a webhook URL is a
    credential, so in those lines it becomes its scheme and host."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.urls and isinstance(record.args, tuple):
            record.args = tuple(_masked(a) if str(a) in self.urls else a for a in record.args)
        return True


def _masked(url: object) -> str:
    parts = urlsplit(str(url))
    return f"{parts.scheme}://{parts.hostname}/***"


_LOG_FILTER = _HideWebhookUrls()
logging.getLogger("httpx").addFilter(_LOG_FILTER)

# One client per event loop (its connections belong to the loop that opened them): the local
# pool and a Modal container each run their handlers on one loop, and keep-alive connections
# spare every row a TLS handshake.
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient] = (
    weakref.WeakKeyDictionary()
)


def _client() -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
        client = httpx.AsyncClient(limits=limits, follow_redirects=False)
        _clients[loop] = client
    return client


async def send_row(config: Mapping[str, Any], row: Mapping[str, Any]) -> str:
    """POST ``row`` (plus the ``request_id`` generated for it) to the Clay table's webhook.
    Returns the request id; raises ``RetryableError`` / ``TerminalError`` as the answer says."""
    webhook = webhook_from_config(config)
    request_id = f"clay-{uuid.uuid4().hex}"
    response = await _post(webhook, {**row, "request_id": request_id})
    _check_answer(response, webhook)
    return _answered_id(response) or request_id


async def _post(webhook: ClayWebhook, body: Mapping[str, Any]) -> httpx.Response:
    headers = {AUTH_HEADER: webhook.token} if webhook.token else {}
    timeout = httpx.Timeout(webhook.timeout, connect=CONNECT_TIMEOUT_SECONDS, pool=None)
    # Messages name the exception's type only: httpx puts the URL into some of them.
    try:
        _LOG_FILTER.urls.update((webhook.url, str(httpx.URL(webhook.url))))
        return await _client().post(webhook.url, json=body, headers=headers, timeout=timeout)
    except httpx.TimeoutException as exc:
        raise RetryableError(
            f"Clay's webhook did not answer within {webhook.timeout:g}s ({type(exc).__name__})"
        ) from None
    except (httpx.UnsupportedProtocol, httpx.InvalidURL):
        raise ConfigurationError(f"{webhook.url_env} is not a URL httpx can post to") from None
    except httpx.TransportError as exc:
        raise RetryableError(f"could not reach Clay's webhook ({type(exc).__name__})") from None


def _check_answer(response: httpx.Response, webhook: ClayWebhook) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    detail = _detail(response, webhook)
    if status in RETRYABLE_STATUS or status >= 500:
        raise RetryableError(f"Clay's webhook answered HTTP {status}{detail}")
    if status in (401, 403):
        raise TerminalError(
            f"Clay's webhook refused its authentication (HTTP {status}{detail}): set "
            f"{webhook.token_env} to the auth token of the table's webhook source"
        )
    if status in (404, 410):
        raise TerminalError(
            f"Clay has no webhook at the URL in {webhook.url_env} (HTTP {status}{detail}): "
            "was the webhook source or its table deleted?"
        )
    raise TerminalError(
        f"Clay's webhook refused the row (HTTP {status}{detail}); note that a webhook source "
        f"takes {SUBMISSION_LIMIT:,} submissions in all, then the table needs a new webhook"
    )


def _detail(response: httpx.Response, webhook: ClayWebhook, limit: int = 200) -> str:
    """``: <Clay's answer>``, short, one line, with any echoed secret masked."""
    text = " ".join(response.text.split())
    if not text:
        return ""
    text = webhook.hide(text)
    return f": {text[:limit]}{'...' if len(text) > limit else ''}"


def _answered_id(response: httpx.Response) -> str | None:
    try:
        data = response.json()
    except ValueError:  # "OK", an empty body, or anything else that is not JSON
        return None
    if not isinstance(data, dict):
        return None
    for key in REQUEST_ID_KEYS:
        value = data.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None
