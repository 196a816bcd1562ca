"""Settings: defaults, environment names, and a DATABASE_URL that never shows its password."""

from __future__ import annotations

import asyncio
import logging
import traceback
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from click.testing import CliRunner

from shared.cli.main import main
from shared.errors import ConfigurationError
from shared.providers.clay import check_clay_config
from shared.providers.exa import check_exa_config
from shared.settings import NIL_UUID, Settings, get_settings, mask_dsn
from shared.state_factory import open_state_api

# libpq's parse error quotes the bad token: here, the password.
MALFORMED = "postgresql://enrich:s3cr%ZZet@127.0.0.1:1/enrich"


@pytest.mark.parametrize(
    ("dsn", "masked"),
    [
        (
            "postgresql://postgres:s3cr%40t@db.example.co:5432/postgres",
            "postgresql://postgres:***@db.example.co:5432/postgres",
        ),
        ("postgresql://postgres@/enrich?host=/tmp/x", "postgresql://postgres@/enrich?host=/tmp/x"),
        (
            "postgresql://u@h/db?sslmode=require&password=hunter2",
            "postgresql://u@h/db?sslmode=require&password=***",
        ),
        ("host=h user=u password=hunter2 dbname=d", "host=h user=u password=*** dbname=d"),
        ("host=h password='a b\\' c' dbname=d", "host=h password=*** dbname=d"),
        # sslpassword: the passphrase of the client's SSL key (libpq connection parameters).
        (
            "postgresql://u@h/db?sslmode=verify-full&sslpassword=k3y-pass",
            "postgresql://u@h/db?sslmode=verify-full&sslpassword=***",
        ),
        (
            "host=h sslkey=/k.pem sslpassword=k3y-pass password=hunter2",
            "host=h sslkey=/k.pem sslpassword=*** password=***",
        ),
        ("host=h SSLPASSWORD = 'k3y pass' dbname=d", "host=h SSLPASSWORD = *** dbname=d"),
    ],
)
def test_mask_dsn(dsn: str, masked: str) -> None:
    assert mask_dsn(dsn) == masked


def test_environment_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    client = UUID("12345678-1234-5678-1234-567812345678")
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:hunter2@h/db")
    monkeypatch.setenv("ENRICH_HOME", str(tmp_path))
    monkeypatch.setenv("ENRICH_PG_BIN", "/opt/pg/bin")
    monkeypatch.setenv("ENRICH_CLIENT_ID", str(client))
    s = Settings()
    assert s.database_dsn == "postgresql://u:hunter2@h/db"
    assert s.database_url_masked == "postgresql://u:***@h/db"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())
    assert s.enrich_home == tmp_path
    assert s.pg_bin_dir == Path("/opt/pg/bin")
    assert s.client_id == client


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DATABASE_URL", "ENRICH_HOME", "ENRICH_PG_BIN", "ENRICH_CLIENT_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", "")  # empty means unset
    s = Settings()
    assert s.database_url is None and s.database_dsn is None
    assert s.client_id == NIL_UUID
    assert s.pg_bin_dir is None
    assert s.enrich_home.name == "enrich"


def test_get_settings_is_cached() -> None:
    assert get_settings() is get_settings()


def test_a_bad_setting_is_one_line_naming_the_variable_never_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ENRICH_DB_OUTAGE_SECONDS", "s3cr3t-looking")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match="ENRICH_DB_OUTAGE_SECONDS") as raised:
            get_settings()
        assert "s3cr3t" not in str(raised.value)
        result = CliRunner().invoke(main, ["batch", "list"])
    finally:
        monkeypatch.delenv("ENRICH_DB_OUTAGE_SECONDS")
        get_settings.cache_clear()
    assert result.exit_code == 2
    assert "bad setting: ENRICH_DB_OUTAGE_SECONDS" in result.stderr
    assert "s3cr3t" not in result.output and "Traceback" not in result.output


async def test_a_malformed_database_url_never_shows_its_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: the URL reached psycopg's pool, which logged `invalid percent-encoded token:
    "s3cr%ZZet"` on every reconnect, and the caller waited for a pool that never filled."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("DATABASE_URL", MALFORMED)
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match="bad setting: DATABASE_URL") as raised:
            await asyncio.wait_for(open_state_api(), timeout=10)
        result = CliRunner().invoke(main, ["batch", "list"])
    finally:
        monkeypatch.delenv("DATABASE_URL")
        get_settings.cache_clear()
    error = raised.value
    shown = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    assert "percent-encode" in shown  # says how to fix it
    assert result.exit_code == 2 and "bad setting: DATABASE_URL" in result.stderr
    for text in (shown, repr(error), caplog.text, result.output):
        assert "s3cr" not in text


def test_settings_built_in_code_never_quote_a_bad_database_url() -> None:
    with pytest.raises(ValueError) as raised:
        Settings(database_url=MALFORMED)
    assert "DATABASE_URL is not a valid PostgreSQL connection string" in str(raised.value)
    assert "s3cr" not in str(raised.value)


# Every client that sends a credential: https, or plain http to this machine only ------------------

SECRET_PATH = "/v3/sources/webhook/pull-in-data-from-a-webhook-5ecret1d"


@pytest.mark.parametrize(
    ("variable", "check"),
    [("CLAY_WEBHOOK_URL", check_clay_config), ("EXA_BASE_URL", check_exa_config)],
)
def test_provider_urls_refuse_plain_http_to_another_host(
    variable: str, check: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EXA_API_KEY", "exa-key-0123456789")
    for local in ("http://127.0.0.1:8788", "http://localhost:8788", "http://[::1]:8788"):
        monkeypatch.setenv(variable, local + SECRET_PATH)
        check({})
    monkeypatch.setenv(variable, "http://api.clay.com" + SECRET_PATH)
    with pytest.raises(ConfigurationError, match=f"{variable} must be an https:// URL") as raised:
        check({})
    assert "5ecret1d" not in str(raised.value)  # the URL itself may be the credential
