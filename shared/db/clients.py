"""Who uses a database server, so ``enrich db down`` can refuse to cut them off.

Every ``enrich`` command names its connections ``enrich <command> (pid N)`` (the CLI sets
``PGAPPNAME``, which libpq reads at every connect unless the DSN names one), and ``enrich dev up``
names its parts ``enrich dev <part>``; ``pg_stat_activity`` then tells who is connected, with the
process to stop. Other clients (psql, an IDE) are shown by their own application name.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from shared.queries import query

# libpq's environment variable for the application_name connection parameter.
APP_NAME_ENV = "PGAPPNAME"
CONNECT_TIMEOUT_S = 5
_PID = re.compile(r"^enrich .*\(pid (\d+)\)$")


def app_name(command: str, pid: int | None = None) -> str:
    """The application name of ``enrich <command>`` run by process ``pid`` (default: this one)."""
    return f"enrich {command} (pid {os.getpid() if pid is None else pid})"


@dataclass(frozen=True)
class Client:
    """The connections of one application name."""

    name: str
    connections: int

    @property
    def pid(self) -> int | None:
        """The process of an ``enrich`` command, from its application name."""
        found = _PID.match(self.name)
        return int(found.group(1)) if found else None

    @property
    def is_dev_part(self) -> bool:
        """A part of ``enrich dev up`` (the relay names its connection itself)."""
        return self.pid is None and (
            self.name.startswith("enrich dev ") or self.name == "enrich-relay"
        )

    def describe(self) -> str:
        name = self.name or "a client without an application name"
        return name if self.connections == 1 else f"{name} ({self.connections} connections)"


def connected_clients(dsn: str) -> list[Client]:
    """The other client connections of the server at ``dsn``, by application name."""
    with psycopg.connect(dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S) as conn:
        rows = conn.execute(query("cluster_clients")).fetchall()
    return [Client(str(name), int(n)) for name, n in rows]


def clients_left(dsn: str, leaving: Callable[[Client], bool], timeout: float = 5.0) -> list[Client]:
    """The clients still connected once those ``leaving`` (processes just stopped) are gone: a
    backend outlives its client by a moment, so wait up to ``timeout`` for theirs to exit."""
    deadline = time.monotonic() + timeout
    while True:
        clients = connected_clients(dsn)
        if not any(leaving(c) for c in clients) or time.monotonic() > deadline:
            return [c for c in clients if not leaving(c)]
        time.sleep(0.05)


def in_use_message(what: str, clients: list[Client]) -> str:
    """One message: ``what`` is in use by whom, how to stop them, and ``--force``."""
    ways = []
    pids = [c.pid for c in clients if c.pid is not None]
    if pids:
        ways.append(f"Ctrl-C where it runs, or `kill {' '.join(str(p) for p in pids)}`")
    if any(c.is_dev_part for c in clients):
        ways.append("`enrich dev down` for the enrich dev parts")
    if any(c.pid is None and not c.is_dev_part for c in clients):
        ways.append("close the other sessions")
    return (
        f"{what} is in use by {', '.join(c.describe() for c in clients)}: stop "
        f"{'it' if len(clients) == 1 else 'them'} first ({'; '.join(ways)}), or stop it anyway "
        "with `enrich db down --force` (a run then stops; nothing is lost, and "
        "`enrich run --batch ID` resumes it)"
    )
