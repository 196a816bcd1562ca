"""A local stand-in for Exa's search API: ``POST /search`` answered the way Exa documents it.

For the bench (``bench/providers.py``) and for trying ``exa_verify`` without a key or a bill:

    python -m shared.providers.exa_standin --port 8788 --latency-ms 50
    EXA_BASE_URL=http://127.0.0.1:8788 EXA_API_KEY=anything \\
        enrich run examples/companies.csv --steps normalize_domain,exa_verify

Shapes follow ``shared.providers.exa``'s sources (https://exa.ai/docs/reference/search,
https://exa.ai/docs/admin/error-codes): a 200 carries ``requestId`` (32 hex digits, new for every
request), ``resolvedSearchType``, ``results`` (``id``, ``url``, ``title``, ``publishedDate``,
``author``, ``score``, ``highlights``, ``highlightScores``) and ``costDollars`` (``total`` plus a
``search`` breakdown); errors carry ``{"requestId", "error", "tag"}``. The key is read from the
``x-api-key`` header (or ``Authorization: Bearer``): missing, or not ``--api-key`` when one is
given, is a 401. With ``--limit-rps`` it answers 429 beyond that many requests in any second, with
``Retry-After`` (Exa's docs do not say it sends one; a stand-in that does exercises both paths).
The 429's ``tag`` (``RATE_LIMIT_EXCEEDED``) is this stand-in's invention.

Results are deterministic per query. A name query ("Acme Inc official website") finds the
company's site: the domain ``--companies FILE.csv`` gives for that name (its website / domain
columns, by ``normalize_domain``'s rules), else the name's letters and digits (legal suffixes
dropped) plus ".com". A query's hash decides the ranking, as a real index would differ by company:
mostly the site first, sometimes after the company's LinkedIn page, and for about one name in
ten not at all (a namesake's site instead). A domain query ("acme.com") finds that domain first.

``GET /stats`` counts the requests answered (searches billed, 429s, 401s, 400s) for tests and the
bench; Exa has no such endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import hashlib
import json
import math
import socket
import sys
import time
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from shared.errors import TerminalError
from shared.steps.domains import find_domain
from shared.steps.names import clean_name

NAME_QUERY_SUFFIX = " official website"
DEFAULT_COST_USD = 0.007


@dataclass
class StandinState:
    api_key: str | None = None
    latency: float = 0.05
    limit_rps: float | None = None
    retry_after: float | None = None  # None: seconds until the window has room
    cost_usd: float = DEFAULT_COST_USD
    companies: Mapping[str, str] = field(default_factory=dict)  # name key -> domain
    stats: dict[str, int] = field(
        default_factory=lambda: {"searches": 0, "rate_limited": 0, "unauthorized": 0, "invalid": 0}
    )
    _window: deque[float] = field(default_factory=deque)

    def admit(self, now: float) -> float | None:
        """None when the request may go on; else the seconds until the window has room."""
        if self.limit_rps is None:
            return None
        while self._window and now - self._window[0] >= 1.0:
            self._window.popleft()
        if len(self._window) >= self.limit_rps:
            return max(0.0, 1.0 - (now - self._window[0]))
        self._window.append(now)
        return None


def name_key(name: str) -> str:
    return " ".join(name.lower().split())


def slug(name: str) -> str:
    """``Beacon Foods, Ltda.`` -> ``beaconfoods``."""
    try:
        cleaned, _ = clean_name(name)
    except TerminalError:
        cleaned = name
    return "".join(c for c in cleaned.lower() if c.isascii() and c.isalnum()) or "company"


def load_companies(path: Path) -> dict[str, str]:
    """Name -> registrable domain from a CSV with a name column and a website/domain/email."""
    companies: dict[str, str] = {}
    with path.open(newline="", encoding="utf-8-sig") as handle:
        for row in csv.DictReader(handle):
            fields = {"_".join(k.lower().split()): v for k, v in row.items() if k}
            name = fields.get("name") or fields.get("company_name") or fields.get("company")
            if not name:
                continue
            try:
                domain = find_domain(fields, {})["domain"]
            except TerminalError:
                continue
            companies[name_key(name)] = str(domain)
    return companies


def _error(status: int, message: str, tag: str, headers: Mapping[str, str] | None = None) -> Any:
    body = {"requestId": uuid.uuid4().hex, "error": message, "tag": tag}
    return JSONResponse(body, status_code=status, headers=dict(headers or {}))


def _key(request: Request) -> str | None:
    key = request.headers.get("x-api-key", "").strip()
    if not key:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            key = auth[7:].strip()
    return key or None


def results_for(query: str, num_results: int, companies: Mapping[str, str]) -> list[dict[str, Any]]:
    """The deterministic results of one query."""
    digest = hashlib.sha256(query.strip().lower().encode()).digest()
    if query.endswith(NAME_QUERY_SUFFIX):
        name = query[: -len(NAME_QUERY_SUFFIX)].strip()
        own = companies.get(name_key(name)) or f"{slug(name)}.com"
        variant = digest[0] % 10
    else:  # a domain query
        name, own, variant = query.strip(), query.strip().lower(), 0
    base = own.split(".")[0]
    site = _page(f"https://www.{own}/", f"{name} - Official Site", f"Welcome to {name}.", 0.92)
    linkedin = _page(
        f"https://www.linkedin.com/company/{base}",
        f"{name} | LinkedIn",
        f"{name} | followers on LinkedIn.",
        0.81,
    )
    directory = _page(
        f"https://www.crunchbase.com/organization/{base}",
        f"{name} - Crunchbase Company Profile",
        f"{name} company profile, funding and investors.",
        0.74,
    )
    news = _page(
        f"https://news.example.org/{base}-{digest[1]}",
        f"{name} announces new partnership",
        f"{name} said on Tuesday it had signed an agreement.",
        0.61,
    )
    namesake = _page(
        f"https://www.{base}-group.net/", f"{name} Group", f"{name} Group, since 1987.", 0.88
    )
    if variant == 9:
        ranked = [namesake, linkedin, directory, news]
    elif variant >= 7:
        ranked = [linkedin, site, directory, news]
    else:
        ranked = [site, linkedin, directory, news]
    return ranked[: max(0, num_results)]


def _page(url: str, title: str, highlight: str, score: float) -> dict[str, Any]:
    return {
        "id": url,
        "url": url,
        "title": title,
        "publishedDate": "2025-06-01T00:00:00.000Z",
        "author": None,
        "score": score,
        "highlights": [highlight],
        "highlightScores": [round(score / 2, 3)],
    }


def build_app(state: StandinState) -> Starlette:
    async def search(request: Request) -> Any:
        key = _key(request)
        if key is None or (state.api_key is not None and key != state.api_key):
            state.stats["unauthorized"] += 1
            message = "Missing API key" if key is None else "Invalid API key"
            return _error(401, message, "INVALID_API_KEY")
        wait = state.admit(time.monotonic())
        if wait is not None:
            state.stats["rate_limited"] += 1
            seconds = state.retry_after if state.retry_after is not None else wait
            return _error(
                429,
                "You have exceeded your rate limit",
                "RATE_LIMIT_EXCEEDED",
                {"Retry-After": str(max(1, math.ceil(seconds)))},
            )
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        query = body.get("query") if isinstance(body, dict) else None
        if not isinstance(query, str) or not query.strip():
            state.stats["invalid"] += 1
            return _error(400, "query is required", "INVALID_REQUEST_BODY")
        num_results = body.get("numResults", 10) if isinstance(body, dict) else 10
        if state.latency > 0:
            await asyncio.sleep(state.latency)
        state.stats["searches"] += 1
        return JSONResponse(
            {
                "requestId": uuid.uuid4().hex,
                "resolvedSearchType": "neural",
                "results": results_for(query, int(num_results), state.companies),
                "costDollars": {"total": state.cost_usd, "search": {"neural": state.cost_usd}},
            }
        )

    async def stats(request: Request) -> Any:
        return JSONResponse(state.stats)

    return Starlette(routes=[Route("/search", search, methods=["POST"]), Route("/stats", stats)])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shared.providers.exa_standin")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8788, help="0: any free port (printed)")
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--api-key", help="the only key accepted (default: any non-empty key)")
    parser.add_argument("--limit-rps", type=float, help="answer 429 beyond this many requests/s")
    parser.add_argument("--retry-after", type=float, help="Retry-After of a 429, in seconds")
    parser.add_argument("--cost-usd", type=float, default=DEFAULT_COST_USD)
    parser.add_argument("--companies", type=Path, help="a CSV naming each company's real site")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    state = StandinState(
        api_key=args.api_key,
        latency=max(0.0, args.latency_ms / 1000),
        limit_rps=args.limit_rps,
        retry_after=args.retry_after,
        cost_usd=args.cost_usd,
        companies=load_companies(args.companies) if args.companies else {},
    )
    # proto=IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and an
    # accepted socket has its listener's proto. Without it, a response written in two parts waits
    # for the client's delayed ACK: 40 ms more per search on a kept-alive connection.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # connections queue from now on: the printed URL is usable at once
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        build_app(state), log_level="warning", access_log=False, lifespan="off", backlog=2048
    )
    print(json.dumps({"exa_standin": f"http://{host}:{port}"}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))
    sys.exit(0)


if __name__ == "__main__":
    main()
