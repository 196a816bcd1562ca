"""``clay_enrich``: company enrichment by a Clay table, the first real ASYNC step.

The handler posts the item to the table's webhook (``shared.providers.clay``) and returns at
once; the table enriches the row, and its HTTP API column posts the answer to the row's
``callback_url``, which ``parse_clay_callback`` turns into the step's result.

What the handler sends, one JSON object per item (each key becomes a column of the Clay table):
``name`` (``clean_company_name``'s result when the step ``needs`` it, else the row's name field),
``domain`` (``normalize_domain``'s result when it ran earlier, else the registrable domain of the
row's website / domain / email fields), ``linkedin_url``, ``callback_url``, and for tracing
``request_id``, ``batch_id``, ``item_id``, ``attempt`` and ``step``. An item with none of name,
domain and LinkedIn URL fails at once: there is nothing to pay Clay for.

What the table's HTTP API column should post back (method POST, URL ``/callback_url``, JSON
body; Clay leaves the body to the table's owner, so this is our convention):

    {"request_id": "/request_id", "company_name": ..., "domain": ..., "linkedin_url": ...,
     "website": ..., "employee_count": ..., "employee_range": ..., "industry": ...,
     "country": ..., "location": ..., "description": ..., "founded_year": ...}

Keys are matched loosely ("Company Name" and "company_name" are one key), common aliases are
accepted (``name``, ``employees``, ``size``, ``founded``, ...; see ``COMMON_FIELDS``), and fields
may also sit in a nested ``company`` object (a whole "Enrich Company" cell). Every field is
optional. The result keeps them as typed values plus the whole body under ``body``, which the
results table ``clay_enrich_results`` turns into typed columns.

``{"error": "..."}`` (any non-empty value) fails the row: terminal unless the body says
``"retryable": true``, because Clay has already run its providers for the row and a retry bills
them again.

A callback URL on this machine (127.0.0.1, a private address) is refused before anything is sent:
Clay's servers could not reach it, so the row would be paid for and then time out. Set
``ENRICH_CALLBACK_BASE_URL`` to a public URL forwarding to the receiver, or, for a stand-in of
Clay on this machine (tests), ``config.allow_local_callback``.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from shared.errors import ConfigurationError, TerminalError
from shared.providers.clay import send_row
from shared.state_api import StepFailure, StepResult, TaskRef
from shared.step_inputs import LINKEDIN_FIELDS as LINKEDIN
from shared.steps.base import (
    StepContext,
    Submitted,
    config_flag,
    field_value,
    normalize_key,
    present_keys,
)
from shared.steps.domains import find_domain
from shared.steps.names import DEFAULT_SOURCE_FIELDS as NAME_FIELDS

LINKEDIN_FIELDS = LINKEDIN  # declared with the step's inputs (shared.step_inputs)

# Result key -> the body keys it is read from, first present wins (compared normalized).
COMMON_FIELDS: Mapping[str, tuple[str, ...]] = {
    "company_name": ("company_name", "name", "company"),
    "domain": ("domain", "company_domain"),
    "linkedin_url": ("linkedin_url", "linkedin", "company_linkedin_url"),
    "website": ("website", "website_url", "url"),
    "employee_count": ("employee_count", "employees", "num_employees", "headcount"),
    "employee_range": ("employee_range", "size", "company_size", "employee_count_range"),
    "industry": ("industry",),
    "country": ("country", "hq_country"),
    "location": ("location", "locality", "headquarters", "hq_location"),
    "description": ("description", "about"),
    "founded_year": ("founded_year", "founded"),
}
INTEGER_FIELDS = frozenset({"employee_count", "founded_year"})
ERROR_TEXT_LIMIT = 500


async def clay_enrich(raw: Mapping[str, Any], ctx: StepContext) -> Submitted:
    if ctx.callback_url is None:
        raise ConfigurationError(
            "clay_enrich is answered by callback, and no callback receiver runs here: "
            "run it with enrich run or enrich serve"
        )
    _require_reachable(ctx.callback_url, ctx.config)
    return Submitted(await send_row(ctx.config, clay_row(raw, ctx, ctx.callback_url)))


def clay_row(raw: Mapping[str, Any], ctx: StepContext, callback_url: str) -> dict[str, Any]:
    """The JSON object posted to the Clay table for this item and attempt."""
    row = {"name": _name(raw, ctx), "domain": _domain(raw, ctx), "linkedin_url": _linkedin(raw)}
    if not any(row.values()):
        raise TerminalError(
            f"nothing for Clay to enrich: no company name, domain or LinkedIn URL "
            f"({present_keys(raw)})"
        )
    return {
        **row,
        "callback_url": callback_url,
        "batch_id": str(ctx.batch_id),
        "item_id": str(ctx.item_id),
        "attempt": ctx.attempt,
        "step": ctx.step_name,
    }


def _text(value: Any) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


def _first_text(raw: Mapping[str, Any], fields: tuple[str, ...]) -> str | None:
    for name in fields:
        found = field_value(raw, name)
        if found is not None and (text := _text(found[1])):
            return text
    return None


def _name(raw: Mapping[str, Any], ctx: StepContext) -> str | None:
    cleaned = _text(ctx.inputs.get("clean_company_name", {}).get("name"))
    return cleaned or _first_text(raw, NAME_FIELDS)


def _domain(raw: Mapping[str, Any], ctx: StepContext) -> str | None:
    normalized = _text(ctx.inputs.get("normalize_domain", {}).get("domain"))
    if normalized:
        return normalized
    try:  # no normalize_domain before this step: the same rules, on the row itself
        return _text(find_domain(raw, {}).get("domain"))
    except TerminalError:
        return None  # no usable domain; the name or LinkedIn URL may still do


def _linkedin(raw: Mapping[str, Any]) -> str | None:
    return _first_text(raw, LINKEDIN_FIELDS)


def _require_reachable(callback_url: str, config: Mapping[str, Any]) -> None:
    if config_flag(config, "allow_local_callback"):
        return
    host = (urlsplit(callback_url).hostname or "").lower()
    if _is_local(host):
        raise ConfigurationError(
            f"Clay calls back over the internet and cannot reach the callback receiver at "
            f"{host}: set ENRICH_CALLBACK_BASE_URL to a public URL that forwards to it"
        )


def _is_local(host: str) -> bool:
    if host in ("", "localhost") or host.endswith((".localhost", ".local")):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name: whether it resolves publicly is the deployment's business
    return address.is_private or address.is_loopback or address.is_link_local


# The callback ------------------------------------------------------------------------------


def parse_clay_callback(task: TaskRef, body: Mapping[str, Any]) -> StepResult | StepFailure:
    """The verdict of a Clay callback body (the receiver's parser for ``clay_enrich``)."""
    error = body.get("error")
    if error not in (None, "", False, {}, []):
        return StepFailure(task, _error_text(error), retryable=body.get("retryable") is True)
    fields = _normalized(body)
    result: dict[str, Any] = {key: _common(fields, key) for key in COMMON_FIELDS}
    result["request_id"] = _text(fields.get("request_id"))
    result["body"] = dict(body)
    return StepResult(task, result)


def _error_text(error: Any) -> str:
    text = error if isinstance(error, str) else json.dumps(error, ensure_ascii=False)
    text = " ".join(text.split())
    return f"Clay: {text[:ERROR_TEXT_LIMIT]}{'...' if len(text) > ERROR_TEXT_LIMIT else ''}"


def _normalized(body: Mapping[str, Any]) -> dict[str, Any]:
    """The body's keys normalized; a nested ``company`` object's keys fill in what the top level
    lacks (a cell holding a whole "Enrich Company" answer)."""
    top = {normalize_key(str(k)): v for k, v in body.items()}
    nested = top.get("company")
    if isinstance(nested, Mapping):
        inner = {normalize_key(str(k)): v for k, v in nested.items()}
        top = {**inner, **{k: v for k, v in top.items() if v is not None and k != "company"}}
    return top


def _common(fields: Mapping[str, Any], key: str) -> str | int | None:
    read = _integer if key in INTEGER_FIELDS else _text
    for alias in COMMON_FIELDS[key]:
        value = read(fields.get(alias))
        if value is not None:
            return value
    return None


def _integer(value: Any) -> int | None:
    """1234, 1234.0 and "1,234" are 1234; ranges ("201-500") and the rest are not integers."""
    number: int | None = None
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and (digits := value.strip().replace(",", "")).isdigit():
        number = int(digits)
    # The typed columns are integers: anything outside [0, 10^9) stays in the body only.
    return number if number is not None and 0 <= number < 10**9 else None
