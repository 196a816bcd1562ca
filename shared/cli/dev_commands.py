"""``enrich dev up|down|status``: the production topology on this machine, every part real.

``enrich dev up`` starts, as background processes with pid and log files under
``<ENRICH_HOME>/dev/`` (or ``--home``), all on 127.0.0.1 with free ports recorded in
``dev/state.json``:

- the database: the private cluster (migrated), or ``DATABASE_URL`` (migrated too);
- ``prefect``: a Prefect server (``prefect server start``), with its own ``PREFECT_HOME`` under
  ``dev/prefect`` (SQLite), waited for on ``/api/health`` (it takes 15-30 s to start);
- ``callbacks``: the callback receiver of ASYNC steps (``python -m shared.callbacks.service``), the
  same app as the Modal web endpoint;
- ``workers``: the local stand-in for Modal (``python -m modal_app.local_service``), handing ASYNC
  steps' providers URLs of ``callbacks`` (``ENRICH_CALLBACK_BASE_URL``);
- ``conductor``: the conductor deployment served (``python -m flows.dev_serve``), run by the event
  ``enrichment.state.changed`` and every minute, dispatching to the local workers;
- ``relay``: ``pg_notify`` to Prefect events (``python -m flows.relay``), the stand-in for pg_net
  and the Prefect Cloud webhook.

It is idempotent: a part already running with the same configuration is left alone; one whose
configuration changed (say the Prefect server came back on another port) is restarted.
``enrich dev down`` stops what ``up`` started (SIGTERM to the process group, SIGKILL after a
deadline) and leaves the database running unless ``--all``. ``shared`` never imports ``flows`` or
``modal_app``: the parts run as ``python -m <module>`` subprocesses.

What it leaves on disk is private to the user running it: ``dev/`` is 0700 and every file in it
(logs, which may hold DSNs and step output; ``state.json``, which holds the workers' token) 0600.
The local workers accept work only from a caller with the token ``up`` makes for them (kept while
they run, so a second ``up`` changes nothing) and hands to the conductor in its environment.

Output conventions as the other commands: ``KEY=value`` lines for scripts on stdout, the rest on
stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import click
import httpx
import psycopg

from shared.cli.errors import friendly_errors
from shared.db.clients import APP_NAME_ENV, clients_left, in_use_message
from shared.db.connect import resolve_dsn
from shared.db.embedded import EmbeddedPostgres
from shared.db.migrate import migrate
from shared.errors import EnrichError
from shared.extras import require_cloud
from shared.private_files import write_private_file
from shared.settings import Settings, ensure_home, get_settings, home_error, mask_dsn

HOST = "127.0.0.1"
DEV_DIR = "dev"
STATE_FILE = "state.json"
# Names the CLI shares with flows/ and modal_app/ without importing them (tests check they agree).
LOCAL_WORKERS_URL_ENV = "ENRICH_LOCAL_WORKERS_URL"
LOCAL_WORKERS_TOKEN_ENV = "ENRICH_LOCAL_WORKERS_TOKEN"
CALLBACK_BASE_URL_ENV = "ENRICH_CALLBACK_BASE_URL"  # read by shared.settings
FLOW_NAME = "enrichment-conductor"
DEPLOYMENT_NAME = "dev"
# The parts, in start order (down stops them in reverse).
PARTS = ("callbacks", "workers", "prefect", "conductor", "relay")
# Settings of the caller's that must not leak into the dev topology (a Prefect Cloud profile, an
# API key, another server's database).
DROPPED_ENV = (
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "PREFECT_PROFILE",
    "PREFECT_PROFILES_PATH",
    "PREFECT_HOME",
    "PREFECT_SERVER_API_HOST",
    "PREFECT_SERVER_API_PORT",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_UI_API_URL",
    "PREFECT_UI_URL",
)
SERVER_START_TIMEOUT_S = 120.0
PART_START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0
POLL_S = 0.25
LOG_TAIL_LINES = 40


class DevError(EnrichError):
    """A part of the dev topology could not be started or stopped."""


# Where things live ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    home: Path

    @property
    def dir(self) -> Path:
        return self.home / DEV_DIR

    @property
    def state_file(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def prefect_home(self) -> Path:
        return self.dir / "prefect"

    def pid_file(self, part: str) -> Path:
        return self.dir / f"{part}.pid"

    def log_file(self, part: str) -> Path:
        return self.dir / f"{part}.log"

    def ready_file(self, part: str) -> Path:
        return self.dir / f"{part}.ready"

    def ensure_dir(self) -> None:
        """``dev/``, private (0700) even when an earlier version made it world-readable."""
        ensure_home(self.home)  # with DATABASE_URL set nothing else checked ENRICH_HOME
        try:
            self.dir.mkdir(mode=0o700, exist_ok=True)
            os.chmod(self.dir, 0o700)
        except OSError as exc:
            raise home_error(self.home, exc) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One ``dev up``/``down`` at a time per home."""
        self.ensure_dir()
        fd = os.open(self.dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


@dataclass
class PartRecord:
    """A started part, as recorded in ``state.json``."""

    pid: int
    argv: list[str]
    fingerprint: str
    started_at: float
    port: int | None = None
    url: str | None = None

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PartRecord:
        return cls(
            pid=int(data["pid"]),
            argv=[str(a) for a in data["argv"]],
            fingerprint=str(data["fingerprint"]),
            started_at=float(data["started_at"]),
            port=int(data["port"]) if data.get("port") is not None else None,
            url=str(data["url"]) if data.get("url") is not None else None,
        )


@dataclass
class DevState:
    parts: dict[str, PartRecord] = field(default_factory=dict)
    database: str | None = None  # the DSN to show (masked when it has a password)
    database_kind: str | None = None  # "embedded" | "external"
    ui: bool = True
    workers_token: str | None = None  # the local workers' bearer token (this file is 0600)

    @classmethod
    def load(cls, layout: Layout) -> DevState:
        try:
            data = json.loads(layout.state_file.read_text())
        except (OSError, ValueError):
            return cls()
        parts: dict[str, PartRecord] = {}
        for name, rec in (data.get("parts") or {}).items():
            with contextlib.suppress(KeyError, TypeError, ValueError):
                parts[name] = PartRecord.from_json(rec)
        return cls(
            parts=parts,
            database=data.get("database"),
            database_kind=data.get("database_kind"),
            ui=bool(data.get("ui", True)),
            workers_token=data.get("workers_token") or None,
        )

    def save(self, layout: Layout) -> None:
        layout.ensure_dir()
        data = {
            "parts": {name: asdict(rec) for name, rec in self.parts.items()},
            "database": self.database,
            "database_kind": self.database_kind,
            "ui": self.ui,
            "workers_token": self.workers_token,
        }
        write_private_file(layout.state_file, json.dumps(data, indent=2) + "\n")


# Processes --------------------------------------------------------------------------------------


def process_alive(pid: int, argv: Sequence[str] | None = None) -> bool:
    """Whether ``pid`` runs (a zombie does not) and, when ``argv`` is given, still runs that
    command line (a recycled pid does not count)."""
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            return False
        # The state follows the command name in parentheses, which may itself hold ") ".
        if stat[stat.rfind(")") + 2 :].startswith("Z"):
            return False
        if argv is not None:
            return [a.decode(errors="replace") for a in cmdline.split(b"\0")[:-1]] == list(argv)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def free_port(preferred: int | None = None) -> int:
    """``preferred`` when it is free on 127.0.0.1 (URLs stay stable across restarts), else any."""
    for candidate in (preferred, 0):
        if candidate is None:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # As the servers bind: a port whose old connections linger in TIME_WAIT is free.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((HOST, candidate))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise DevError("no free TCP port on 127.0.0.1")


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def start_process(
    layout: Layout, part: str, argv: Sequence[str], env: Mapping[str, str]
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session (so ``down`` can signal its whole process group), output
    appended to ``<part>.log``, pid written to ``<part>.pid``."""
    layout.ensure_dir()
    log_path = layout.log_file(part)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)  # a log an earlier version left world-readable
    with open(fd, "ab") as log:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        log.write(f"\n===== {stamp} enrich dev up: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Named in pg_stat_activity, so `enrich db down` can say what `enrich dev down` stops.
            env={**env, APP_NAME_ENV: f"enrich dev {part}"},
            cwd=layout.dir,
            start_new_session=True,
        )
    write_private_file(layout.pid_file(part), f"{proc.pid}\n")
    return proc


def stop_process(pid: int, argv: Sequence[str] | None, timeout: float) -> bool:
    """SIGTERM the process group of ``pid`` (the part and what it started), then SIGKILL after
    ``timeout`` seconds. Returns whether it was running."""
    if not process_alive(pid, argv):
        return False

    def signal_group(sig: signal.Signals) -> None:
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_alive(pid):
        signal_group(signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        # The leader is gone; finish off anything of its group that outlived it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    if process_alive(pid):
        raise DevError(f"process {pid} survived SIGKILL")
    return True


# The parts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How to run one part on a given port."""

    part: str
    argv: list[str]
    env: dict[str, str]
    port: int | None
    url: str | None
    # The settings that, changed, mean the running part must be restarted.
    identity: dict[str, str]

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({"argv": self.argv, "identity": self.identity}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def base_env(layout: Layout, dsn: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DROPPED_ENV}
    env.update(
        ENRICH_HOME=str(layout.home),
        DATABASE_URL=dsn,
        PREFECT_HOME=str(layout.prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONUNBUFFERED="1",
    )
    return env


def http_url(port: int) -> str:
    return f"http://{HOST}:{port}"


def plan_callbacks(env: Mapping[str, str], port: int) -> Plan:
    argv = [sys.executable, "-m", "shared.callbacks.service", "--host", HOST, "--port", str(port)]
    identity = {"dsn": env["DATABASE_URL"]}
    return Plan("callbacks", argv, dict(env), port, http_url(port), identity)


def plan_workers(env: Mapping[str, str], port: int, callbacks_url: str, token: str) -> Plan:
    argv = [sys.executable, "-m", "modal_app.local_service", "--host", HOST, "--port", str(port)]
    # The token goes through the environment, never argv (which any local user can read).
    full = {**env, CALLBACK_BASE_URL_ENV: callbacks_url, LOCAL_WORKERS_TOKEN_ENV: token}
    identity = {"dsn": env["DATABASE_URL"], "callbacks": callbacks_url, "token": token}
    return Plan("workers", argv, full, port, http_url(port), identity)


def plan_prefect(env: Mapping[str, str], port: int, *, ui: bool) -> Plan:
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    if not ui:
        argv.append("--no-ui")
    identity = {"prefect_home": env["PREFECT_HOME"]}
    return Plan("prefect", argv, dict(env), port, http_url(port), identity)


def plan_conductor(env: Mapping[str, str], api_url: str, workers_url: str, token: str) -> Plan:
    argv = [sys.executable, "-m", "flows.dev_serve", "--name", DEPLOYMENT_NAME]
    full = {
        **env,
        "PREFECT_API_URL": api_url,
        LOCAL_WORKERS_URL_ENV: workers_url,
        LOCAL_WORKERS_TOKEN_ENV: token,
    }
    identity = {"dsn": env["DATABASE_URL"], "api": api_url, "workers": workers_url, "token": token}
    return Plan("conductor", argv, full, None, None, identity)


def plan_relay(layout: Layout, env: Mapping[str, str], api_url: str) -> Plan:
    ready = str(layout.ready_file("relay"))
    argv = [sys.executable, "-m", "flows.relay", "--ready-file", ready]
    full = {**env, "PREFECT_API_URL": api_url}
    identity = {"dsn": env["DATABASE_URL"], "api": api_url}
    return Plan("relay", argv, full, None, None, identity)


@dataclass
class Outcome:
    part: str
    record: PartRecord
    started: bool  # False: it was already running and left alone


class Topology:
    """Starts (or keeps) the parts and records them in ``state.json`` as it goes, so a failure
    half-way leaves a state ``dev down`` can clean up."""

    def __init__(self, layout: Layout, state: DevState, echo: Callable[[str], None]) -> None:
        self.layout = layout
        self.state = state
        self.echo = echo

    def running(self, part: str) -> PartRecord | None:
        rec = self.state.parts.get(part)
        return rec if rec is not None and process_alive(rec.pid, rec.argv) else None

    def ensure(
        self, part: str, make_plan: Callable[[int | None], Plan], *, needs_port: bool
    ) -> Outcome:
        current = self.running(part)
        if current is not None:
            plan = make_plan(current.port)
            if plan.fingerprint == current.fingerprint:
                return Outcome(part, current, started=False)
            self.echo(f"{part}: configuration changed, restarting (pid {current.pid})")
            stop_process(current.pid, current.argv, STOP_TIMEOUT_S)
        previous = self.state.parts.get(part)
        port = free_port(previous.port if previous else None) if needs_port else None
        plan = make_plan(port)
        self.layout.ready_file(part).unlink(missing_ok=True)
        proc = start_process(self.layout, part, plan.argv, plan.env)
        record = PartRecord(proc.pid, plan.argv, plan.fingerprint, time.time(), plan.port, plan.url)
        self.state.parts[part] = record
        self.state.save(self.layout)
        return Outcome(part, record, started=True)

    def wait(self, outcome: Outcome, ready: Callable[[], bool], timeout: float) -> float:
        """Until ``ready()``; fail early when the process exits. Returns the seconds waited."""
        began = time.monotonic()
        deadline = began + timeout
        rec = outcome.record
        while not ready():
            if not process_alive(rec.pid, rec.argv):
                raise DevError(
                    f"{outcome.part} exited during start-up; last lines of "
                    f"{self.layout.log_file(outcome.part)}:\n{log_tail(self.layout.log_file(outcome.part))}"
                )
            if time.monotonic() > deadline:
                raise DevError(
                    f"{outcome.part} not ready within {timeout:.0f}s; last lines of "
                    f"{self.layout.log_file(outcome.part)}:\n{log_tail(self.layout.log_file(outcome.part))}"
                )
            time.sleep(POLL_S)
        return time.monotonic() - began


def http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def deployment_polled_since(api_url: str, since: float) -> bool:
    """Whether the served deployment exists and its runner polled for work after ``since``."""
    try:
        response = httpx.get(
            f"{api_url}/deployments/name/{FLOW_NAME}/{DEPLOYMENT_NAME}", timeout=2.0
        )
    except httpx.HTTPError:
        return False
    if response.status_code != 200:
        return False
    polled = response.json().get("last_polled")
    if not polled:
        return False
    try:
        when = datetime.fromisoformat(str(polled).replace("Z", "+00:00"))
    except ValueError:
        return False
    return when.timestamp() >= since - 1.0


# The database -----------------------------------------------------------------------------------


def prepare_database(settings: Settings) -> tuple[str, str, str]:
    """(dsn, dsn to show, kind): the private cluster started and migrated, or DATABASE_URL
    migrated."""
    external = settings.database_dsn
    try:
        dsn = asyncio.run(resolve_dsn(settings))
        if external is not None:
            asyncio.run(migrate(dsn))
    except psycopg.Error as exc:
        raise DevError(f"cannot prepare the database: {exc}") from exc
    if external is not None:
        return dsn, mask_dsn(dsn), "external"
    return dsn, dsn, "embedded"


# Commands ---------------------------------------------------------------------------------------


def _settings(home: Path | None) -> Settings:
    if home is None:
        return get_settings()
    return Settings(enrich_home=home.absolute())


def _info(message: str) -> None:
    click.echo(message, err=True)


home_option = click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    help="Use this ENRICH_HOME (default: $ENRICH_HOME or the per-user data directory).",
)


@click.group("dev")
def dev() -> None:
    """The production topology on this machine: Postgres, a Prefect server, the conductor
    deployment, the pg_notify relay and local workers standing in for Modal."""


@dev.command("up")
@home_option
@click.option("--ui/--no-ui", default=True, show_default=True, help="Serve the Prefect UI.")
@click.option(
    "--timeout",
    type=click.FloatRange(1, 3600),
    default=SERVER_START_TIMEOUT_S,
    show_default=True,
    help="Seconds to wait for the Prefect server to answer.",
)
@friendly_errors
def up(home: Path | None, ui: bool, timeout: float) -> None:
    """Start every part not running yet (idempotent); print the URLs and the DSN."""
    # Before the database is touched: the Prefect server, the conductor and the relay all run on
    # Prefect, which the local install leaves out.
    require_cloud("enrich dev up", "prefect")
    settings = _settings(home)
    layout = Layout(settings.enrich_home)
    began = time.monotonic()
    with layout.locked():
        dsn, shown, kind = prepare_database(settings)
        _info(f"database ({kind}): {shown}")
        state = DevState.load(layout)
        state.database, state.database_kind, state.ui = shown, kind, ui
        state.save(layout)
        topo = Topology(layout, state, _info)
        env = base_env(layout, dsn)

        callbacks = topo.ensure(
            "callbacks", lambda port: plan_callbacks(env, _port(port)), needs_port=True
        )
        callbacks_url = _url(callbacks)
        token = workers_token(topo)
        workers = topo.ensure(
            "workers",
            lambda port: plan_workers(env, _port(port), callbacks_url, token),
            needs_port=True,
        )
        prefect = topo.ensure(
            "prefect", lambda port: plan_prefect(env, _port(port), ui=ui), needs_port=True
        )
        server_url = _url(prefect)
        api_url = f"{server_url}/api"
        waited = topo.wait(prefect, lambda: http_ok(f"{api_url}/health"), timeout)
        _report(prefect, f"{server_url} (ready after {waited:.1f}s)")
        topo.wait(callbacks, lambda: http_ok(f"{callbacks_url}/health"), PART_START_TIMEOUT_S)
        _report(callbacks, f"{callbacks_url}/callbacks/{{token}}")
        workers_url = _url(workers)
        topo.wait(workers, lambda: http_ok(f"{workers_url}/health"), PART_START_TIMEOUT_S)
        _report(workers, workers_url)

        conductor = topo.ensure(
            "conductor",
            lambda _: plan_conductor(env, api_url, workers_url, token),
            needs_port=False,
        )
        relay = topo.ensure("relay", lambda _: plan_relay(layout, env, api_url), needs_port=False)
        since = conductor.record.started_at
        topo.wait(conductor, lambda: deployment_polled_since(api_url, since), PART_START_TIMEOUT_S)
        _report(conductor, f"deployment {FLOW_NAME}/{DEPLOYMENT_NAME}")
        topo.wait(relay, layout.ready_file("relay").exists, PART_START_TIMEOUT_S)
        _report(relay, "LISTEN enrichment_state_changed -> enrichment.state.changed")

    _info(f"dev topology up in {time.monotonic() - began:.1f}s; logs in {layout.dir}")
    if ui:
        _info(f"Prefect UI: {server_url}")
    click.echo(f"PREFECT_UI_URL={server_url if ui else ''}")
    click.echo(f"PREFECT_API_URL={api_url}")
    click.echo(f"{LOCAL_WORKERS_URL_ENV}={workers_url}")
    click.echo(f"{CALLBACK_BASE_URL_ENV}={callbacks_url}")
    click.echo(f"DATABASE_URL={shown}")


def workers_token(topo: Topology) -> str:
    """The local workers' token: the one they run with, else a new one (saved in the 0600
    ``state.json`` before any part gets it). Made per start of the workers, not per ``up``, so a
    second ``up`` leaves the running workers and conductor alone."""
    state = topo.state
    if state.workers_token is None or topo.running("workers") is None:
        state.workers_token = secrets.token_urlsafe(32)
        state.save(topo.layout)
    return state.workers_token


def _port(port: int | None) -> int:
    if port is None:
        raise DevError("internal error: a port was expected")
    return port


def _url(outcome: Outcome) -> str:
    if outcome.record.url is None:
        raise DevError(f"internal error: {outcome.part} has no URL")
    return outcome.record.url


def _report(outcome: Outcome, what: str) -> None:
    verb = "started" if outcome.started else "already running"
    _info(f"{outcome.part:<10} {verb} (pid {outcome.record.pid}): {what}")


@dev.command("down")
@home_option
@click.option("--all", "stop_all", is_flag=True, help="Stop the private database cluster too.")
@click.option(
    "--timeout",
    type=click.FloatRange(0, 600),
    default=STOP_TIMEOUT_S,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL.",
)
@friendly_errors
def down(home: Path | None, stop_all: bool, timeout: float) -> None:
    """Stop what enrich dev up started; the database keeps running unless --all."""
    settings = _settings(home)
    layout = Layout(settings.enrich_home)
    with layout.locked():
        state = DevState.load(layout)
        for part in reversed(PARTS):
            rec = state.parts.pop(part, None)
            if rec is None:
                continue
            if stop_process(rec.pid, rec.argv, timeout):
                _info(f"{part:<10} stopped (pid {rec.pid})")
            else:
                _info(f"{part:<10} was not running")
            layout.pid_file(part).unlink(missing_ok=True)
            layout.ready_file(part).unlink(missing_ok=True)
            state.save(layout)
        if stop_all:
            if settings.database_dsn is not None:
                _info("database: DATABASE_URL is set, nothing to stop")
                return
            cluster = EmbeddedPostgres(settings=settings)
            _refuse_if_others_use(cluster)
            if cluster.stop(by="`enrich dev down --all`"):
                _info("database: private cluster stopped")
            else:
                _info("database: private cluster was not running")


def _refuse_if_others_use(cluster: EmbeddedPostgres) -> None:
    """``--all`` stops the parts, not an ``enrich run`` or a psql session also using the cluster:
    those make it refuse, as ``enrich db down`` does."""
    if not cluster.status().reachable:
        return
    try:
        others = clients_left(cluster.dsn_for("postgres"), lambda c: c.is_dev_part)
    except psycopg.OperationalError:
        return  # nobody can connect: nobody to cut off
    if others:
        raise DevError(
            f"{in_use_message(f'the private PostgreSQL at {cluster.home}', others)}; the enrich "
            "dev parts are stopped"
        )


@dev.command("status")
@home_option
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@friendly_errors
def status(home: Path | None, as_json: bool) -> None:
    """Each part: pid, alive, port / URL, log file."""
    settings = _settings(home)
    layout = Layout(settings.enrich_home)
    state = DevState.load(layout)
    rows: list[dict[str, Any]] = []
    for part in PARTS:
        rec = state.parts.get(part)
        rows.append(
            {
                "part": part,
                "pid": rec.pid if rec else None,
                "alive": bool(rec and process_alive(rec.pid, rec.argv)),
                "port": rec.port if rec else None,
                "url": rec.url if rec else None,
                "log": str(layout.log_file(part)),
            }
        )
    database = _database_status(settings)
    prefect = state.parts.get("prefect")
    api_url = f"{prefect.url}/api" if prefect and prefect.url else None
    if as_json:
        doc = {"home": str(layout.home), "database": database, "parts": rows, "api_url": api_url}
        click.echo(json.dumps(doc, indent=2))
        return
    click.echo(f"dev home: {layout.dir}")
    click.echo(f"database  {database['state']}: {database['dsn'] or '-'}")
    for row in rows:
        alive = "running" if row["alive"] else ("stopped" if row["pid"] else "not started")
        where = row["url"] or ""
        if row["part"] == "prefect" and row["url"]:
            where = f"{row['url']} (API {row['url']}/api)"
        elif row["part"] == "conductor" and api_url:
            where = f"deployment {FLOW_NAME}/{DEPLOYMENT_NAME}"
        elif row["part"] == "relay" and row["pid"]:
            where = "LISTEN enrichment_state_changed"
        pid = str(row["pid"]) if row["pid"] else "-"
        click.echo(f"{row['part']:<10} {alive:<12} pid {pid:<8} {where}")


def _database_status(settings: Settings) -> dict[str, Any]:
    if settings.database_dsn is not None:
        return {"kind": "external", "state": "external", "dsn": settings.database_url_masked}
    st = EmbeddedStatusView.read(settings)
    return {"kind": "embedded", "state": st.state, "dsn": st.dsn, "pid": st.pid}


@dataclass(frozen=True)
class EmbeddedStatusView:
    state: str
    dsn: str
    pid: int | None

    @classmethod
    def read(cls, settings: Settings) -> EmbeddedStatusView:
        st = EmbeddedPostgres(settings=settings).status()
        state = "running" if st.running else ("stopped" if st.initialized else "not initialised")
        return cls(state, st.dsn, st.pid)


def register_dev_commands(group: click.Group) -> None:
    """Add ``dev up|down|status`` to the ``enrich`` group."""
    group.add_command(dev)


__all__ = ["DevError", "Layout", "dev", "process_alive", "register_dev_commands"]
