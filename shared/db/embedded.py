"""The embedded default: a private PostgreSQL cluster under ``<enrich_home>/pg``.

It uses the machine's PostgreSQL server binaries and listens on a unix socket only (no TCP port to
collide with or expose). Who may connect is decided twice: the socket directory is private (mode
0700) to the user that owns the cluster, and ``pg_hba.conf`` (rewritten at every start, see
``auth_files``) admits only socket connections whose peer is the operator (the user running
``enrich``; as root, root and the ``postgres`` OS user), mapped to the ``postgres`` database role,
and rejects every TCP line, so a later ``listen_addresses`` change cannot open it to the network.
PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` OS user and
every server command runs through ``runuser -u postgres --``. The cluster's directories are never
followed through a symlink nor taken over from another user: the first would hand an arbitrary
directory to ``postgres`` (chown, chmod 0700), the second a directory someone else controls.

Starting is idempotent and safe when several processes start it at once (an ``fcntl`` lock).

The server makes its socket once, at start. If the socket directory (or the socket) is removed
while it runs, it keeps serving the connections it has but can accept no new one: ``status()``
says so, and ``start(repair=True)`` (``enrich db up``) recreates the directory and restarts it.
Other starts refuse with that advice rather than restart a server whose open connections may
still be doing work.

``stop()`` leaves a note (``<enrich_home>/pg.stopped``: who stopped it) until the next start, so a
run that loses its connections can tell a deliberate ``enrich db down`` (give up now, with the
resume command) from a restart or a crash (ride it out).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from shared.errors import EmbeddedPostgresError
from shared.private_files import write_private_file
from shared.settings import Settings, ensure_home, get_settings, home_error

DEFAULT_DATABASE = "enrich"
SUPERUSER = "postgres"
PORT = 5432
SERVER_BINARIES = ("initdb", "pg_ctl", "postgres")
INSTALL_HINT = "install the PostgreSQL server, e.g. `apt-get install postgresql`"
RESTART_ADVICE = "restart it with `enrich db down && enrich db up` (`enrich db up` alone does too)"
# sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
START_TIMEOUT_S = 60
LOG_TAIL_LINES = 30

# Appended to postgresql.conf after initdb. A dev-machine cluster, not a production one.
SERVER_CONFIG = """
# --- enrich: private dev cluster -------------------------------------------------------------
listen_addresses = ''
unix_socket_directories = '{socket_dir}'
unix_socket_permissions = 0700
port = {port}
max_connections = 200
shared_buffers = 256MB
# synchronous_commit=off is safe here: a crash of the app loses nothing (a commit it saw is in the
# server). A crash of the server or the OS loses at most the last ~0.6 s (3 x wal_writer_delay)
# of commits, never consistency (fsync stays on): those are state transitions, which the fencing
# (attempt) and lease logic retries, so no work is lost, only redone.
synchronous_commit = off
fsync = on
log_min_messages = warning
log_line_prefix = '%m [%p] '
"""

# The ident map of pg_hba.conf's peer line: these OS users may connect as the `postgres` role.
IDENT_MAP = "enrich"


@dataclass(frozen=True)
class EmbeddedStatus:
    """What ``EmbeddedPostgres.status()`` reports."""

    running: bool
    initialized: bool
    pid: int | None
    data_dir: Path
    dsn: str
    version: str | None
    bin_dir: Path | None
    # Why a running server cannot take new connections (its socket is gone), else None.
    problem: str | None = None

    @property
    def reachable(self) -> bool:
        return self.running and self.problem is None


def find_bin_dir(configured: Path | None = None, data_dir: Path | None = None) -> Path:
    """Locate the directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Order: ``configured`` (ENRICH_PG_BIN); the Debian directory of the major version an existing
    ``data_dir`` was created with; ``pg_config --bindir``; the newest ``/usr/lib/postgresql/*/bin``;
    ``PATH``.
    """
    if configured is not None:
        if _has_server_binaries(configured):
            return configured
        raise EmbeddedPostgresError(
            f"ENRICH_PG_BIN={configured} does not hold {', '.join(SERVER_BINARIES)}"
        )
    candidates: list[Path] = []
    if data_dir is not None and (data_dir / "PG_VERSION").is_file():
        major = (data_dir / "PG_VERSION").read_text().strip()
        candidates.append(Path("/usr/lib/postgresql") / major / "bin")
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            )
            candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.extend(_debian_bin_dirs())
    on_path = shutil.which("initdb")
    if on_path is not None:
        candidates.append(Path(on_path).resolve().parent)
    for candidate in candidates:
        if _has_server_binaries(candidate):
            return candidate
    raise EmbeddedPostgresError(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) found: "
        f"{INSTALL_HINT}, or set ENRICH_PG_BIN to their directory, or set DATABASE_URL"
    )


def _debian_bin_dirs() -> list[Path]:
    root = Path("/usr/lib/postgresql")
    if not root.is_dir():
        return []

    def key(p: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", p.name)) or (0,)

    return [d / "bin" for d in sorted(root.iterdir(), key=key, reverse=True)]


def _has_server_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in SERVER_BINARIES)


class EmbeddedPostgres:
    """A private PostgreSQL cluster: ``<home>/pg/{data,run,postgres.log}``."""

    def __init__(
        self,
        home: Path | None = None,
        *,
        bin_dir: Path | None = None,
        database: str = DEFAULT_DATABASE,
        settings: Settings | None = None,
    ) -> None:
        cfg = settings or get_settings()
        self.home = (home or cfg.enrich_home).absolute()
        self.cluster_dir = self.home / "pg"
        self.data_dir = self.cluster_dir / "data"
        self.socket_dir = self.cluster_dir / "run"
        self.log_file = self.cluster_dir / "postgres.log"
        self.lock_file = self.home / "pg.lock"
        self.stop_note = self.home / "pg.stopped"
        self.database = database
        self._configured_bin_dir = bin_dir if bin_dir is not None else cfg.pg_bin_dir
        self._bin_dir: Path | None = None
        # Set by start(repair=True) when it restarted a server that had lost its socket.
        self.restarted_because: str | None = None
        # Set by start() when it started the server (rather than found it running).
        self.started = False

    # -- public API --------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        """The DSN of ``self.database`` (valid once the cluster runs)."""
        return self.dsn_for(self.database)

    def dsn_for(self, database: str) -> str:
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://{SUPERUSER}@/{quote(database, safe='')}?host={host}&port={PORT}"

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = find_bin_dir(self._configured_bin_dir, self.data_dir)
        return self._bin_dir

    def start(self, *, repair: bool = False) -> str:
        """Initialise (first time) and start the cluster, create the database; return its DSN.

        A no-op when it already runs. Safe to call from several processes at once. A server that
        runs but lost its socket is restarted with ``repair=True`` (its open connections end;
        ``restarted_because`` then says why); without it, that is an ``EmbeddedPostgresError``.
        """
        self._check_socket_path()
        ensure_home(self.home)
        with self._locked():
            owner = self._owner()
            problem = self._socket_problem() if self._initialized() else None
            self._prepare_dirs(owner)
            if not self._initialized():
                self._initdb()
            auth_changed = self._write_auth_files(owner)
            if not self._is_running():
                self._pg_ctl_start()
                self.started = True
            elif problem is not None:
                if not repair:
                    raise EmbeddedPostgresError(
                        f"the private cluster runs (pid {self._postmaster_pid()}) but cannot be "
                        f"reached: {problem}. `enrich db up` restarts it (closing the "
                        "connections it still has)"
                    )
                self._pg_ctl_stop()
                self._pg_ctl_start()
                self.started = True
                self.restarted_because = problem
            elif (changed := self._binaries_problem()) is not None:
                # Safe to restart only at the operator's word (`enrich db up`): every new
                # connection fails anyway, and enrich's own runs ride out a restart.
                if not repair or not self._same_major():
                    raise EmbeddedPostgresError(
                        f"the private cluster runs (pid {self._postmaster_pid()}) but {changed}"
                        + ("" if "pg_upgrade" in changed else f"; {RESTART_ADVICE}")
                    )
                self._pg_ctl_stop()
                self._pg_ctl_start()
                self.started = True
                self.restarted_because = changed
            elif auth_changed:
                # A cluster made by an older version (trust everywhere) is tightened in place.
                self._pg_ctl_reload()
            self._create_database()
            self.stop_note.unlink(missing_ok=True)
        return self.dsn

    def stop(self, by: str = "`enrich db down`") -> bool:
        """Stop the cluster (``pg_ctl stop -m fast``); return whether it was running. ``by`` (who
        stops it) is left in ``stop_note`` for the clients that lose their connections."""
        if not self._initialized():
            return False
        ensure_home(self.home)
        with self._locked():
            if not self._is_running():
                return False
            # Written first: a client sees its connection end only after this is on disk.
            write_private_file(self.stop_note, by, None)
            try:
                self._pg_ctl_stop()
            except BaseException:
                self.stop_note.unlink(missing_ok=True)
                raise
            return True

    def stopped_by(self) -> str | None:
        """Who stopped the cluster on purpose (``stop(by=...)``), if it was not started since
        (by ``start()``, which removes the note, or by hand: a server started after the note)."""
        try:
            noted = self.stop_note.stat().st_mtime
            by = self.stop_note.read_text(errors="replace").strip()
        except OSError:
            return None
        started = self._postmaster_started()
        if started is not None and started > noted:
            return None
        return by or "`enrich db down`"

    def _postmaster_started(self) -> float | None:
        """When the running server started (line 3 of ``postmaster.pid``, epoch seconds). Not
        the file's mtime: the server rewrites its status line when it begins to stop."""
        try:
            return float((self.data_dir / "postmaster.pid").read_text().splitlines()[2])
        except (OSError, IndexError, ValueError):
            return None

    def status(self) -> EmbeddedStatus:
        """Whether the cluster runs (and can be reached), its postmaster pid, data dir, DSN and
        server version."""
        initialized = self._initialized()
        try:
            bin_dir: Path | None = self.bin_dir
        except EmbeddedPostgresError:
            bin_dir = None
        running = initialized and bin_dir is not None and self._is_running()
        return EmbeddedStatus(
            running=running,
            initialized=initialized,
            pid=self._postmaster_pid() if running else None,
            data_dir=self.data_dir,
            dsn=self.dsn,
            version=self._version(bin_dir),
            bin_dir=bin_dir,
            problem=(self._socket_problem() or self._binaries_problem()) if running else None,
        )

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log ('' when there is none)."""
        try:
            text = self.log_file.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- internals ---------------------------------------------------------------------------

    def _check_socket_path(self) -> None:
        socket_path = self.socket_dir / f".s.PGSQL.{PORT}"
        if len(os.fsencode(socket_path)) > MAX_SOCKET_PATH:
            raise EmbeddedPostgresError(
                f"the socket path {socket_path} is {len(os.fsencode(socket_path))} bytes, over the "
                f"{MAX_SOCKET_PATH}-byte limit of unix sockets: set ENRICH_HOME to a shorter path"
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            # O_NOFOLLOW: a planted symlink must not make us create or lock another file.
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise home_error(self.home, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _owner(self) -> pwd.struct_passwd | None:
        """The OS user to run the server as: None for the current user, ``postgres`` as root."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise EmbeddedPostgresError(
                "PostgreSQL refuses to run as root and there is no `postgres` OS user to run it "
                f"as: {INSTALL_HINT} (it creates that user), or run as an unprivileged user"
            ) from None

    def _prepare_dirs(self, owner: pwd.struct_passwd | None) -> None:
        for d in (self.cluster_dir, self.socket_dir):
            with contextlib.suppress(FileExistsError):
                d.mkdir(mode=0o700)
            _take_private_dir(d, owner)
        if owner is not None:
            probe = subprocess.run(
                ["runuser", "-u", owner.pw_name, "--", "test", "-w", str(self.cluster_dir)],
                capture_output=True,
                check=False,
            )
            if probe.returncode != 0:
                raise EmbeddedPostgresError(
                    f"the `{owner.pw_name}` OS user cannot reach {self.cluster_dir}: make its "
                    f"parent directories traversable (chmod o+x) or set ENRICH_HOME elsewhere "
                    f"(the default as root is /var/lib/enrich)"
                )

    def _run_pg(
        self, argv: Sequence[str], *, timeout: float = START_TIMEOUT_S + 30
    ) -> subprocess.CompletedProcess[str]:
        """Run a server command as the cluster's owner (via runuser when we are root)."""
        cmd = list(argv)
        owner = self._owner()
        if owner is not None:
            cmd = ["runuser", "-u", owner.pw_name, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        try:
            return subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                check=False,
                timeout=timeout,
                cwd=self.cluster_dir,
                env=env,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EmbeddedPostgresError(f"{' '.join(cmd)} failed: {exc}") from exc

    def _initdb(self) -> None:
        if self.data_dir.exists() and any(self.data_dir.iterdir()):
            raise EmbeddedPostgresError(
                f"{self.data_dir} is not empty but holds no PostgreSQL cluster: remove it"
            )
        result = self._run_pg(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                # Replaced at once by _write_auth_files (an ident map needs its own line), but
                # never trust in between.
                "--auth-local=peer",
                "--auth-host=reject",
                "-E",
                "UTF8",
                "--locale=C",
            ],
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed ({result.returncode}):\n{result.stderr.strip()}"
            )
        conf = SERVER_CONFIG.format(socket_dir=self.socket_dir, port=PORT)
        with (self.data_dir / "postgresql.conf").open("a") as fh:
            fh.write(conf)

    def _write_auth_files(self, owner: pwd.struct_passwd | None) -> bool:
        """Write ``pg_hba.conf`` and ``pg_ident.conf`` (see ``auth_files``); whether either
        changed (then a running server must reload them)."""
        changed = False
        for name, text in auth_files(_operators(owner)).items():
            path = self.data_dir / name
            try:
                if path.read_text() == text:
                    continue
            except OSError:
                pass
            write_private_file(path, text, owner)
            changed = True
        return changed

    def _initialized(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def _socket_problem(self) -> str | None:
        """Why a server that says it is ready has no socket to connect to, or None.

        The postmaster creates its socket once, at start, and never again: a removed socket (or
        socket directory) stays missing until a restart. A server still starting or stopping
        has none by right.
        """
        if self._postmaster_state() != "ready":
            return None
        if not self.socket_dir.is_dir():
            return f"its socket directory {self.socket_dir} is gone"
        socket = self.socket_dir / f".s.PGSQL.{PORT}"
        if not socket.is_socket():
            return f"its socket {socket} is gone"
        return None

    def _binaries_problem(self) -> str | None:
        """Why a running server fails every new connection though it takes them: its package
        was upgraded under it (it runs the old binary, deleted, but each backend loads the new
        plpgsql.so: "undefined symbol"); or None.

        Told by the version the server reports against ``postgres --version`` on disk.
        """
        if self._postmaster_state() != "ready":
            return None
        on_disk = self._version(self.bin_dir)
        wanted = version_number(on_disk)
        try:
            with psycopg.connect(self.dsn_for("postgres"), connect_timeout=5) as conn:
                running = conn.info.server_version
        except psycopg.Error:
            return None  # unreachable: the socket check or the start says why
        if wanted is None or running == wanted:
            return None
        problem = (
            f"the PostgreSQL binaries changed under it (a package upgrade): it runs "
            f"{running // 10000}.{running % 10000}, {self.bin_dir} now holds {on_disk}, so new "
            "connections cannot load its libraries"
        )
        if running // 10000 != wanted // 10000:
            major = running // 10000
            problem += (
                f"; its PostgreSQL {major} server is gone from disk: reinstall it (e.g. `apt-get "
                f"install postgresql-{major}`) or upgrade the cluster (pg_upgrade)"
            )
        return problem

    def _same_major(self) -> bool:
        """Whether the binaries on disk can run this data directory (its ``PG_VERSION``)."""
        on_disk = version_number(self._version(self.bin_dir))
        try:
            major = int((self.data_dir / "PG_VERSION").read_text().strip())
        except (OSError, ValueError):
            return False
        return on_disk is not None and on_disk // 10000 == major

    def _postmaster_state(self) -> str | None:
        """The status line of ``postmaster.pid`` (``ready``, ``starting``, ``stopping``...)."""
        try:
            lines = (self.data_dir / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        return lines[7].strip() if len(lines) > 7 else None

    def _pg_ctl_stop(self) -> None:
        result = self._run_pg(
            [
                str(self.bin_dir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                "fast",
                "-w",
                "-t",
                str(START_TIMEOUT_S),
            ],
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"pg_ctl stop failed ({result.returncode}): {result.stderr.strip()}"
            )

    def _pg_ctl_reload(self) -> None:
        result = self._run_pg([str(self.bin_dir / "pg_ctl"), "reload", "-D", str(self.data_dir)])
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"pg_ctl reload failed ({result.returncode}): {result.stderr.strip()}"
            )

    def _is_running(self) -> bool:
        if not (self.data_dir / "postmaster.pid").exists():
            return False
        result = self._run_pg([str(self.bin_dir / "pg_ctl"), "status", "-D", str(self.data_dir)])
        return result.returncode == 0

    def _pg_ctl_start(self) -> None:
        result = self._run_pg(
            [
                str(self.bin_dir / "pg_ctl"),
                "start",
                "-w",
                "-t",
                str(START_TIMEOUT_S),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
            ],
        )
        if result.returncode != 0:
            raise EmbeddedPostgresError(
                f"PostgreSQL did not start ({result.returncode}): {result.stderr.strip()}\n"
                f"--- last lines of {self.log_file} ---\n{self.log_tail()}"
            )

    def _create_database(self) -> None:
        try:
            with psycopg.connect(self.dsn_for("postgres"), autocommit=True) as conn:
                exists = conn.execute(
                    "select 1 from pg_database where datname = %s", (self.database,)
                ).fetchone()
                if exists is None:
                    # Another process not holding our lock may create it meanwhile.
                    with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                        conn.execute(
                            sql.SQL("create database {}").format(sql.Identifier(self.database))
                        )
        except psycopg.OperationalError as exc:
            raise EmbeddedPostgresError(
                f"cannot connect to the private cluster: {exc}\n"
                f"--- last lines of {self.log_file} ---\n{self.log_tail()}"
            ) from exc

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data_dir / "postmaster.pid").read_text().splitlines()[0]
            return int(first)
        except (OSError, IndexError, ValueError):
            return None

    @staticmethod
    def _version(bin_dir: Path | None) -> str | None:
        if bin_dir is None:
            return None
        try:
            out = subprocess.run(
                [str(bin_dir / "postgres"), "--version"],
                capture_output=True,
                text=True,
                check=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip().removeprefix("postgres (PostgreSQL) ") or None


def version_number(version: str | None) -> int | None:
    """``15.18 (Debian 15.18-0+deb12u1)`` as libpq's number, 150018 (PostgreSQL 10 and later)."""
    match = re.match(r"(\d+)\.(\d+)", version or "")
    return int(match.group(1)) * 10000 + int(match.group(2)) if match else None


# Files and directories of the cluster ----------------------------------------------------------


def _take_private_dir(path: Path, owner: pwd.struct_passwd | None) -> None:
    """Make ``path`` a directory private to the cluster's owner (0700), refusing a symlink or a
    directory of another user. Done on a descriptor opened with O_NOFOLLOW, so a symlink swapped
    in after a check cannot redirect the chown and chmod."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if path.is_symlink():
            raise EmbeddedPostgresError(
                f"{path} is a symlink (to {os.readlink(path)}): the private cluster's directories "
                "must be real directories; remove the link or set ENRICH_HOME elsewhere"
            ) from None
        raise EmbeddedPostgresError(f"cannot use {path}: {exc.strerror or exc}") from exc
    try:
        found = os.fstat(fd).st_uid
        # Ours: made by this user, or (as root) already handed to the cluster's owner.
        allowed = {os.geteuid()} | ({owner.pw_uid} if owner is not None else set())
        if found not in allowed:
            raise EmbeddedPostgresError(
                f"{path} belongs to {_user_name(found)}, not to "
                f"{' or '.join(sorted(_user_name(u) for u in allowed))}: refusing to take over "
                "another user's directory; remove it or set ENRICH_HOME elsewhere"
            )
        if owner is not None:
            os.fchown(fd, owner.pw_uid, owner.pw_gid)
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def _user_name(uid: int) -> str:
    try:
        return f"`{pwd.getpwuid(uid).pw_name}`"
    except KeyError:
        return f"uid {uid}"


def _operators(owner: pwd.struct_passwd | None) -> list[str] | None:
    """The OS users that may connect as the ``postgres`` role: the user running the cluster (and,
    as root, root itself); None when this uid has no name (a container's bare ``-u 1234``), where
    peer authentication cannot work."""
    if owner is not None:
        return ["root", owner.pw_name]
    try:
        return [pwd.getpwuid(os.geteuid()).pw_name]
    except KeyError:
        return None


def auth_files(operators: Sequence[str] | None) -> dict[str, str]:
    """``pg_hba.conf`` and ``pg_ident.conf`` of the private cluster.

    Socket connections are checked with ``peer`` (the kernel's SO_PEERCRED, not a claim of the
    client's) through an ident map allowing only ``operators`` to log in, and only as the
    ``postgres`` role; any other role or OS user is refused. Every TCP connection is rejected
    (the server listens on none; this keeps it so if ``listen_addresses`` is ever set). With no
    operator name (``None``) peer cannot identify anyone, so the socket falls back to ``trust``:
    still reachable only by the owner and root, through the 0700 socket directory.
    """
    header = (
        "# Written by enrich (shared/db/embedded.py) at every start of the private cluster:\n"
        "# edits here are replaced.\n"
    )
    if operators is None:
        local = "local all all trust\n"
        ident = ""
    else:
        local = f"local all {SUPERUSER} peer map={IDENT_MAP}\n"
        ident = "".join(f"{IDENT_MAP} {_conf_word(u)} {SUPERUSER}\n" for u in operators)
    hba = f"{header}# TYPE DATABASE USER ADDRESS METHOD\n{local}host all all all reject\n"
    return {"pg_hba.conf": hba, "pg_ident.conf": f"{header}{ident}"}


def _conf_word(word: str) -> str:
    """A word of a PostgreSQL auth file, double-quoted unless plain."""
    if re.fullmatch(r"[A-Za-z0-9_.@-]+", word):
        return word
    return '"' + word.replace('"', '""') + '"'
