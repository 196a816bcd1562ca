"""The private PostgreSQL cluster: start, idempotent start, concurrent start, status, stop, errors.

Each test runs its own cluster in its own short directory (``short_home``), beside the session's.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from shared.db import embedded
from shared.db.embedded import MAX_SOCKET_PATH, EmbeddedPostgres, find_bin_dir
from shared.errors import EmbeddedPostgresError
from shared.settings import Settings
from tests.conftest import wait_for


def _cluster(home: Path) -> EmbeddedPostgres:
    return EmbeddedPostgres(home=home, settings=Settings(enrich_home=home))


def _query(dsn: str, query: str) -> object:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(query.encode()).fetchone()
    assert row is not None
    return row[0]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def test_status_before_init(short_home: Path) -> None:
    st = _cluster(short_home).status()
    assert not st.initialized
    assert not st.running
    assert st.pid is None
    assert st.data_dir == short_home / "pg" / "data"


def test_start_status_idempotent_stop_restart(short_home: Path) -> None:
    cluster = _cluster(short_home)
    dsn = cluster.start()
    assert dsn == f"postgresql://postgres@/enrich?host={short_home}/pg/run&port=5432"
    assert _query(dsn, "select current_database()") == "enrich"
    # Unix socket only, and the dev tuning is in place.
    assert _query(dsn, "show listen_addresses") == ""
    assert _query(dsn, "show max_connections") == "200"
    assert _query(dsn, "show synchronous_commit") == "off"
    assert _query(dsn, "show fsync") == "on"

    st = cluster.status()
    assert st.running and st.initialized
    assert st.pid is not None and _pid_alive(st.pid)
    assert st.dsn == dsn
    assert st.version is not None and st.version[0].isdigit()
    if os.geteuid() == 0:  # the server runs as the postgres OS user, not root
        assert (short_home / "pg" / "data").stat().st_uid != 0

    # Starting a running cluster is a no-op that returns the same DSN.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create table kept (x int)")
        conn.execute("insert into kept values (42)")
    assert cluster.start() == dsn
    assert cluster.status().pid == st.pid

    assert cluster.stop() is True
    wait_for(lambda: not _pid_alive(st.pid or 0))
    after = cluster.status()
    assert after.initialized and not after.running and after.pid is None
    assert cluster.stop() is False  # stopping a stopped cluster is a no-op

    # Restart: the data survived.
    assert cluster.start() == dsn
    assert _query(dsn, "select x from kept") == 42


def test_concurrent_start_from_two_processes(short_home: Path) -> None:
    code = (
        "import sys; from pathlib import Path; from shared.db.embedded import EmbeddedPostgres;"
        "from shared.settings import Settings; h = Path(sys.argv[1]);"
        "print(EmbeddedPostgres(home=h, settings=Settings(enrich_home=h)).start())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(short_home)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for proc, (_out, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err
    dsns = {out.strip() for out, _ in outs}
    assert len(dsns) == 1
    assert _query(dsns.pop(), "select 1") == 1


def test_socket_path_too_long() -> None:
    long_home = Path("/tmp") / ("x" * MAX_SOCKET_PATH)
    with pytest.raises(EmbeddedPostgresError, match="107-byte limit"):
        _cluster(long_home).start()
    assert not long_home.exists()


def test_start_failure_reports_log_tail(short_home: Path) -> None:
    cluster = _cluster(short_home)
    cluster.start()
    cluster.stop()
    with (cluster.data_dir / "postgresql.conf").open("a") as fh:
        fh.write("\nshared_buffers = 'not a size'\n")
    with pytest.raises(EmbeddedPostgresError) as info:
        cluster.start()
    message = str(info.value)
    assert "did not start" in message
    assert "shared_buffers" in message  # from the server log's tail


def test_bad_configured_bin_dir(tmp_path: Path) -> None:
    with pytest.raises(EmbeddedPostgresError, match="ENRICH_PG_BIN"):
        find_bin_dir(tmp_path)


def test_no_binaries_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(embedded, "_debian_bin_dirs", lambda: [])
    with pytest.raises(EmbeddedPostgresError, match="apt-get install postgresql"):
        find_bin_dir(None)


def test_root_without_postgres_user(short_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_such_user(name: str) -> object:
        raise KeyError(name)

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(pwd, "getpwnam", no_such_user)
    with pytest.raises(EmbeddedPostgresError, match="no `postgres` OS user"):
        _cluster(short_home).start()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the cluster to the postgres user")
def test_root_home_not_traversable() -> None:
    home = Path(os.path.realpath("/tmp")) / f"enr0700-{os.getpid()}"
    home.mkdir(mode=0o700)
    try:
        with pytest.raises(EmbeddedPostgresError, match="cannot reach"):
            _cluster(home / "inner").start()
    finally:
        shutil.rmtree(home, ignore_errors=True)
