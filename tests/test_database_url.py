"""An unreachable or malformed DATABASE_URL: one bounded connection attempt and one message naming
DATABASE_URL (password masked) and what a valid one looks like (issue 10, item 6).

Before: psycopg_pool retried for its 30 s open timeout, logging the same error six times, and a
server that never answered was waited on for libpq's default (no timeout).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result

from shared.cli.main import main
from shared.db import connect
from shared.errors import DatabaseUnavailable
from shared.settings import get_settings

SECRET = "s3cretpw"
BATCH = "00000000-0000-0000-0000-000000000001"
VALID = "a valid one looks like postgresql://user:password@host:5432/postgres"


@pytest.fixture
def closed_port() -> int:
    """A localhost port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A localhost port that takes connections (the kernel's backlog) and never says a word: a
    server behind a black-holing firewall, as far as the client can tell."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield int(server.getsockname()[1])


def enrich(monkeypatch: pytest.MonkeyPatch, url: str, *args: str) -> Result:
    monkeypatch.setenv("DATABASE_URL", url)
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(main, list(args), catch_exceptions=False)
    finally:
        get_settings.cache_clear()


@pytest.mark.parametrize(
    "command", [("status", BATCH), ("run", "--batch", BATCH), ("batch", "list"), ("db", "status")]
)
def test_an_unreachable_database_url_is_one_message(
    monkeypatch: pytest.MonkeyPatch, closed_port: int, command: tuple[str, ...]
) -> None:
    url = f"postgresql://enrich:{SECRET}@127.0.0.1:{closed_port}/postgres"
    result = enrich(monkeypatch, url, *command)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and SECRET not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # not psycopg_pool's "error connecting in ..." per try
    line = lines[0]
    masked = f"DATABASE_URL=postgresql://enrich:***@127.0.0.1:{closed_port}/postgres"
    assert f"cannot connect to {masked}: connection to server at " in line
    assert "Connection refused. Is the server running" in line  # libpq's two lines, as one
    assert VALID in line and "the project's Connect dialog" in line


async def test_a_silent_server_is_given_up_on_at_the_deadline(
    monkeypatch: pytest.MonkeyPatch, silent_port: int
) -> None:
    seen: list[dict[str, Any]] = []
    real_connect = psycopg.AsyncConnection.connect

    async def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs)
        return await real_connect(*args, **kwargs)

    # libpq's own bound for each address, below the deadline of the whole attempt, itself < 5 s.
    assert connect.CONNECT_TIMEOUT_S < connect.PROBE_DEADLINE_S < 5
    monkeypatch.setattr(psycopg.AsyncConnection, "connect", spy)
    # The real deadline is PROBE_DEADLINE_S (4 s, measured by hand); a short one keeps this fast.
    monkeypatch.setattr(connect, "PROBE_DEADLINE_S", 0.3)
    url = f"postgresql://enrich:{SECRET}@127.0.0.1:{silent_port}/postgres"
    with pytest.raises(DatabaseUnavailable) as raised:
        await connect.check_reachable(url)
    message = str(raised.value)
    assert message.startswith(
        f"cannot connect to DATABASE_URL=postgresql://enrich:***@127.0.0.1:{silent_port}/postgres:"
        " no answer within 0.3 s; "
    )
    assert VALID in message and SECRET not in message
    assert seen and seen[0]["connect_timeout"] == connect.CONNECT_TIMEOUT_S


async def test_resolve_dsn_checks_an_external_database_url_first(
    monkeypatch: pytest.MonkeyPatch, closed_port: int
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://enrich:{SECRET}@127.0.0.1:{closed_port}/db")
    get_settings.cache_clear()
    try:
        with pytest.raises(DatabaseUnavailable, match=r"cannot connect to DATABASE_URL="):
            await connect.resolve_dsn()
    finally:
        get_settings.cache_clear()


async def test_a_reachable_database_url_passes(dsn: str) -> None:
    await connect.check_reachable(dsn)


async def test_a_database_url_is_probed_once_per_process(
    monkeypatch: pytest.MonkeyPatch, dsn: str
) -> None:
    """The local worker service resolves per spawn: one probe connection, not one per spawn."""
    probes: list[str] = []
    real = connect.check_reachable

    async def counting(url: str) -> None:
        probes.append(url)
        await real(url)

    monkeypatch.setattr(connect, "check_reachable", counting)
    monkeypatch.setenv("DATABASE_URL", dsn)
    get_settings.cache_clear()
    try:
        assert [await connect.resolve_dsn() for _ in range(3)] == [dsn] * 3
    finally:
        get_settings.cache_clear()
    assert probes == [dsn]
