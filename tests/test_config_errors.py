"""Settings and environment errors: one line naming the variable and what is valid, exit 2, no
traceback, nothing written (issue 10, item 5).

Bad typed settings, an ENRICH_HOME that cannot hold the private cluster, and PostgreSQL binaries
upgraded under the running cluster (simulated: ``postgres --version`` is made to report another
version, on a cluster of the test's own).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result

from shared.callbacks.token import load_keys
from shared.cli.main import main
from shared.db.embedded import EmbeddedPostgres, version_number
from shared.errors import ConfigurationError
from shared.pg_state import translate_db_error
from shared.settings import Settings, get_settings


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The CLI's environment, settings re-read before and after the test."""
    monkeypatch.delenv("DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def enrich(*args: str) -> Result:
    # catch_exceptions=False: a traceback fails the test rather than hiding in result.exception.
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def one_error_line(result: Result) -> str:
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].lower().startswith("error: ")
    return lines[0]


# Typed settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "valid"),
    [
        ("ENRICH_CLIENT_ID", "acme", "must be a UUID such as 123e4567-"),
        ("ENRICH_DB_OUTAGE_SECONDS", "soon", "must be a number of seconds greater than 0"),
        ("ENRICH_DB_OUTAGE_SECONDS", "-5", "must be a number of seconds greater than 0"),
        ("ENRICH_LOG_LEVEL", "chatty", "must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("ENRICH_CALLBACK_BASE_URL", "callbacks-host", "is not an http(s) URL"),
        ("DATABASE_URL", "https://xyz.supabase.co", "postgresql://user:password@host:5432/"),
        ("DATABASE_URL", "just some words", "postgresql://user:password@host:5432/"),
    ],
)
def test_a_bad_typed_setting_is_one_line_naming_it_and_what_is_valid(
    env: pytest.MonkeyPatch, variable: str, value: str, valid: str
) -> None:
    env.setenv(variable, value)
    result = enrich("batch", "list")
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert line.startswith(f"error: bad setting: {variable}: ")
    assert valid in line
    assert value not in line  # never echoed: the value may be a secret


def test_a_pasted_supabase_api_url_points_to_the_connect_dialog(env: pytest.MonkeyPatch) -> None:
    env.setenv("DATABASE_URL", "https://xyz.supabase.co")
    line = one_error_line(enrich("status", "00000000-0000-0000-0000-000000000001"))
    assert "is an https:// URL, not a PostgreSQL connection string" in line
    assert "the connection string from the project's Connect dialog" in line
    assert "missing" not in line  # libpq's "missing "=" after ..." is gone


def test_the_log_level_is_case_insensitive(env: pytest.MonkeyPatch) -> None:
    env.setenv("ENRICH_LOG_LEVEL", "debug")
    assert get_settings().log_level == "DEBUG"


# ENRICH_HOME ------------------------------------------------------------------------------------


def _homes(tmp_path: Path) -> list[tuple[Path, str]]:
    a_file = tmp_path / "home-is-a-file"
    a_file.write_text("keep me\n")
    return [
        (a_file, f"{a_file} is a file, not a directory"),
        (a_file / "enrich", f"{a_file} is a file, not a directory"),
        # /proc takes no new directory (ENOENT) and /proc/1 no new file: as root too.
        (Path("/proc/enrich-test"), "its file system (like /proc or /sys) holds no such file"),
        (Path("/proc/1"), "no permission to write in /proc/1"),
    ]


@pytest.mark.parametrize("command", [("batch", "list"), ("db", "up")])
def test_an_unusable_enrich_home_is_one_line_naming_it_and_why(
    env: pytest.MonkeyPatch, tmp_path: Path, command: tuple[str, ...]
) -> None:
    for home, reason in _homes(tmp_path):
        env.setenv("ENRICH_HOME", str(home))
        get_settings.cache_clear()
        result = enrich(*command)
        assert result.exit_code == 2, result.output
        line = one_error_line(result)
        assert f"ENRICH_HOME={home} cannot be used: " in line
        assert reason in line
        assert "set ENRICH_HOME to a directory you can write" in line
    assert (tmp_path / "home-is-a-file").read_text() == "keep me\n"  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home-is-a-file"]


def test_dev_up_with_database_url_and_an_unusable_enrich_home_is_one_line(
    env: pytest.MonkeyPatch, tmp_path: Path, dsn: str
) -> None:
    """With DATABASE_URL set no cluster checks ENRICH_HOME: dev/'s own creation must."""
    env.setenv("DATABASE_URL", dsn)
    for home, reason in _homes(tmp_path)[:2]:
        env.setenv("ENRICH_HOME", str(home))
        get_settings.cache_clear()
        line = one_error_line(enrich("dev", "up", "--no-ui"))
        assert f"ENRICH_HOME={home} cannot be used: {reason}" in line
    assert (tmp_path / "home-is-a-file").read_text() == "keep me\n"


def test_the_callback_key_file_in_an_unusable_enrich_home_is_one_error(tmp_path: Path) -> None:
    """`enrich run`/`serve` with DATABASE_URL still keep the callback key in ENRICH_HOME."""
    for home, _reason in _homes(tmp_path):
        with pytest.raises(ConfigurationError, match=re.escape(f"ENRICH_HOME={home} ")):
            load_keys(Settings(enrich_home=home))
    with pytest.raises(ConfigurationError, match=r"its file system .* holds no such file"):
        load_keys(Settings(enrich_home=Path("/proc/1")))  # as root too: no file made there


@pytest.mark.skipif(os.geteuid() != 0, reason="as root: /sys refuses root too")
def test_an_enrich_home_refusing_even_root_is_one_line(env: pytest.MonkeyPatch) -> None:
    env.setenv("ENRICH_HOME", "/sys/kernel")
    line = one_error_line(enrich("db", "up"))
    expected = "ENRICH_HOME=/sys/kernel cannot be used: no permission to create /sys/kernel/pg.lock"
    assert expected in line


# PostgreSQL upgraded under the running private cluster ------------------------------------------


def test_binaries_changed_under_the_running_cluster_are_reported_and_db_up_restarts(
    env: pytest.MonkeyPatch, short_home: Path
) -> None:
    env.setenv("ENRICH_HOME", str(short_home))
    cluster = EmbeddedPostgres(home=short_home, settings=Settings(enrich_home=short_home))
    cluster.start()
    before = cluster.status()
    assert before.reachable and before.version is not None
    running = version_number(before.version)
    assert running is not None
    # The package upgrade: the binaries on disk now say the next minor release.
    upgraded = f"{running // 10000}.{running % 10000 + 1} (Debian)"
    env.setattr(EmbeddedPostgres, "_version", staticmethod(lambda _bin_dir: upgraded))
    changed = "the PostgreSQL binaries changed under it (a package upgrade): it runs "

    status = enrich("db", "status")
    assert status.exit_code == 1, status.output
    assert "none pending" not in status.stdout
    line = one_error_line(status)
    assert changed in line and "new connections cannot load its libraries" in line
    assert f"it runs {running // 10000}.{running % 10000}, " in line and upgraded in line
    assert "`enrich db up` restarts it" in line

    listed = enrich("batch", "list")  # any other command: the advice, no restart behind our back
    assert listed.exit_code == 1
    line = one_error_line(listed)
    assert f"the private cluster runs (pid {before.pid}) but {changed}" in line
    assert "restart it with `enrich db down && enrich db up`" in line
    assert cluster.status().pid == before.pid

    up = enrich("db", "up")  # the operator's word: restart it
    assert up.exit_code == 0, up.output
    assert f"private cluster restarted: {changed}" in up.stdout
    env.undo()  # the restarted server runs what is on disk
    after = cluster.status()
    assert after.reachable and after.problem is None and after.pid != before.pid


def test_a_cluster_whose_major_version_is_gone_is_not_restarted(
    env: pytest.MonkeyPatch, short_home: Path
) -> None:
    cluster = EmbeddedPostgres(home=short_home, settings=Settings(enrich_home=short_home))
    cluster.start()
    pid = cluster.status().pid
    env.setattr(EmbeddedPostgres, "_version", staticmethod(lambda _bin_dir: "99.1"))
    with pytest.raises(Exception, match=r"server is gone from disk: reinstall it .*pg_upgrade"):
        cluster.start(repair=True)
    env.undo()
    assert cluster.status().pid == pid and cluster.restarted_because is None


async def test_a_library_the_server_cannot_load_says_restart_it(
    conn: psycopg.AsyncConnection[tuple[object, ...]],
) -> None:
    """What every new backend of an upgraded-under-it server hits (plpgsql.so: undefined
    symbol), made for real with a file that is no library."""
    folder = Path(tempfile.mkdtemp(prefix="enrlib", dir="/tmp"))
    try:
        folder.chmod(0o755)  # the server may run as the postgres OS user
        lib = folder / "not_a_library.so"
        lib.write_text("not ELF\n")
        lib.chmod(0o644)
        with pytest.raises(psycopg.Error) as raised:
            await conn.execute(f"load '{lib}'".encode())
    finally:
        shutil.rmtree(folder)
    error = translate_db_error(raised.value)
    assert isinstance(error, ConfigurationError)
    assert str(error).startswith(f'could not load library "{lib}"')
    assert "restart it (the private cluster: `enrich db down && enrich db up`)" in str(error)
