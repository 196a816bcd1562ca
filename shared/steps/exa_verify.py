"""``exa_verify``: does a web search for the company land on the domain we have for it?

One Exa search per item (``shared.providers.exa``): the company's name plus "official website",
or the bare domain when the row has no name. The domain is never put into a name search, since
that would only find what it was told. The answer verifies the domain when one of the results is
on it (same registrable domain, by the rules ``normalize_domain`` uses: a LinkedIn page about the
company is not its site).

Inputs: ``normalize_domain``'s result when it ran earlier (``config.needs``), else the row's own
website / domain / email fields; the name from ``clean_company_name`` when the config needs it,
else the row's name fields. An item without any domain fails at once, before Exa is paid; with
the registry's ``skip_unless`` such items never reach the handler (they complete as skipped).

The result (``exa_verify_results`` derives typed columns from it):

``verified``      true when a result is on the domain
``confidence``    how strongly the search supports the domain, 0 to 1: 0.95 when the top result is
                  on it, 0.1 less per rank below (at least 0.5), 0 when none is; a search by the
                  domain alone (no name) counts for at most 0.6
``domain``, ``company_name``, ``query``   what was searched
``matched_url``, ``matched_rank``        the first result on the domain (rank from 1)
``title``, ``snippet``, ``evidence_url`` the evidence: that result, else the top result
``top_url``, ``top_domain``              what Exa ranked first
``request_id``, ``cost_usd``, ``search_type``   Exa's ``requestId``, the call's cost, the search run
``results``       the first results (url, title, domain), for review
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.errors import TerminalError
from shared.providers.exa import Hit, search
from shared.steps.base import StepContext, field_value, present_keys
from shared.steps.domains import find_domain
from shared.steps.names import DEFAULT_SOURCE_FIELDS as NAME_FIELDS

TOP_CONFIDENCE = 0.95
RANK_PENALTY = 0.1
MIN_MATCH_CONFIDENCE = 0.5
DOMAIN_ONLY_CONFIDENCE = 0.6
KEPT_RESULTS = 5


async def exa_verify(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any]:
    domain = _domain(raw, ctx)
    if domain is None:
        raise TerminalError(
            f"nothing for Exa to verify: no domain from normalize_domain or the row "
            f"({present_keys(raw)})"
        )
    name = _name(raw, ctx)
    query = f"{name} official website" if name else domain
    answer = await search(ctx.config, query, ctx.charge)
    return {
        **verdict(domain, answer.hits, by_name=name is not None),
        "domain": domain,
        "company_name": name,
        "query": query,
        "request_id": answer.request_id,
        "cost_usd": answer.cost_usd,
        "search_type": answer.search_type,
    }


def verdict(domain: str, hits: tuple[Hit, ...], *, by_name: bool) -> dict[str, Any]:
    """What the search says about ``domain``: see the module docstring for each key."""
    domains = [registrable_domain(hit.url) for hit in hits]
    rank = next((i for i, found in enumerate(domains) if found == domain), None)
    confidence = 0.0
    if rank is not None:
        confidence = max(MIN_MATCH_CONFIDENCE, TOP_CONFIDENCE - RANK_PENALTY * rank)
        if not by_name:
            confidence = min(confidence, DOMAIN_ONLY_CONFIDENCE)
    evidence = hits[rank] if rank is not None else (hits[0] if hits else None)
    return {
        "verified": rank is not None,
        "confidence": round(confidence, 2),
        "matched_url": hits[rank].url if rank is not None else None,
        "matched_rank": rank + 1 if rank is not None else None,
        "title": evidence.title if evidence else None,
        "snippet": evidence.snippet if evidence else None,
        "evidence_url": evidence.url if evidence else None,
        "top_url": hits[0].url if hits else None,
        "top_domain": domains[0] if hits else None,
        "results": [
            {"url": hit.url, "title": hit.title, "domain": found}
            for hit, found in zip(hits[:KEPT_RESULTS], domains, strict=False)
        ],
    }


def registrable_domain(url: str) -> str | None:
    """The company domain a result URL is on, by ``normalize_domain``'s rules (None for a
    social profile, a directory, an IP address...)."""
    try:
        found = find_domain({"website": url}, {})
    except TerminalError:
        return None
    value = found.get("domain")
    return value if isinstance(value, str) else None


def _text(value: Any) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


def _domain(raw: Mapping[str, Any], ctx: StepContext) -> str | None:
    normalized = ctx.inputs.get("normalize_domain")
    if normalized is not None:  # it ran: its answer stands, even an empty one
        return _text(normalized.get("domain"))
    try:
        return _text(find_domain(raw, {}).get("domain"))
    except TerminalError:
        return None


def _name(raw: Mapping[str, Any], ctx: StepContext) -> str | None:
    cleaned = _text(ctx.inputs.get("clean_company_name", {}).get("name"))
    if cleaned:
        return cleaned
    for key in NAME_FIELDS:
        found = field_value(raw, key)
        if found is not None and (text := _text(found[1])):
            return " ".join(text.split())
    return None
