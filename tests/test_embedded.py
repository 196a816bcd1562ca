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
from psycopg.conninfo import make_conninfo

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


# Who may connect, and which directories the cluster takes (issue 9, item 10) ----------------------


def _connects_as(dsn: str, role: str) -> bool:
    try:
        with psycopg.connect(make_conninfo(dsn, user=role), connect_timeout=5):
            return True
    except psycopg.OperationalError:
        return False


def test_only_the_operator_connects_and_only_as_postgres(short_home: Path) -> None:
    cluster = _cluster(short_home)
    dsn = cluster.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create role mallory login")
        rules = conn.execute(
            "select type, database, user_name, address, auth_method, options"
            " from pg_hba_file_rules order by line_number"
        ).fetchall()
    # Peer for the socket, through the ident map; every TCP line rejects; no trust anywhere.
    assert rules == [
        ("local", ["all"], ["postgres"], None, "peer", ["map=enrich"]),
        ("host", ["all"], ["all"], "all", "reject", None),
    ]
    ident = (short_home / "pg" / "data" / "pg_ident.conf").read_text()
    operator = "root postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    mapped = [line.split()[1] for line in ident.splitlines() if line.startswith("enrich ")]
    assert mapped == operator.split()
    # Any login role could connect under trust; now only postgres can, and only for us.
    assert _connects_as(dsn, "postgres")
    assert not _connects_as(dsn, "mallory")


def test_a_cluster_made_with_trust_is_tightened_at_the_next_start(short_home: Path) -> None:
    cluster = _cluster(short_home)
    dsn = cluster.start()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("create role mallory login")
    # What earlier versions wrote (initdb --auth=trust), picked up by the running server.
    hba = short_home / "pg" / "data" / "pg_hba.conf"
    hba.write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("select pg_reload_conf()")
    wait_for(lambda: _connects_as(dsn, "mallory"))

    assert cluster.start() == dsn  # running: the files are rewritten and the server reloads
    wait_for(lambda: not _connects_as(dsn, "mallory"))
    assert _connects_as(dsn, "postgres")
    assert "trust" not in hba.read_text()


def test_a_symlinked_cluster_directory_is_refused_and_its_target_untouched(
    short_home: Path,
) -> None:
    target = short_home / "elsewhere"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    before = target.stat()
    (short_home / "pg").symlink_to(target)
    with pytest.raises(EmbeddedPostgresError, match="is a symlink"):
        _cluster(short_home).start()
    after = target.stat()
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )
    assert list(target.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="making a directory of another user needs root")
def test_a_cluster_directory_of_another_user_is_refused(short_home: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    foreign = short_home / "pg"
    foreign.mkdir(mode=0o755)
    os.chown(foreign, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(EmbeddedPostgresError, match="belongs to `nobody`"):
        _cluster(short_home).start()
    st = foreign.stat()
    assert st.st_uid == nobody.pw_uid and st.st_mode & 0o777 == 0o755
