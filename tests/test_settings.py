"""Settings: defaults, environment names, and a DATABASE_URL that never shows its password."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID

import pytest
from click.testing import CliRunner

from shared.cli.main import main
from shared.errors import ConfigurationError
from shared.settings import NIL_UUID, Settings, get_settings, mask_dsn


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
