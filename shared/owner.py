"""Who holds a lease: the local pool names itself on the rows it claims, so a later process on the
same machine can tell that the holder is gone (kill -9, a crash, a reboot) and take its rows back
at once instead of waiting out their leases.

An owner is ``host:boot/pid/start``: the host name, this boot of the machine (a reboot ends every
process), the process id, and the process's start time (so a recycled pid is not mistaken for the
holder). Only owners of this host are ever judged; any other is presumed alive.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


@lru_cache(maxsize=1)
def host_prefix() -> str:
    """``host:boot/``: what every owner on this machine (this boot or another) starts with up to
    the pid. Ask the database for owners starting with ``host:``."""
    return f"{socket.gethostname()}:{_boot_id()}/"


def host_owners_prefix() -> str:
    """``host:``: what every owner ever named on this machine starts with."""
    return f"{socket.gethostname()}:"


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip().replace("-", "")[:12]
    except OSError:
        return "noboot"


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 (the state) on; empty where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return stat[stat.rfind(")") + 2 :].split()


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22), or None."""
    fields = _stat_fields(pid)
    return fields[19] if len(fields) > 19 else None


def process_owner(pid: int | None = None) -> str:
    """The owner name of process ``pid`` (default: this one)."""
    pid = os.getpid() if pid is None else pid
    return f"{host_prefix()}{pid}/{_start_ticks(pid) or '-'}"


def owner_gone(owner: str) -> bool:
    """True only when ``owner`` names a process of this host that certainly no longer runs."""
    host = host_owners_prefix()
    if not owner.startswith(host):
        return False  # another machine: nothing can be known from here
    boot, _, rest = owner[len(host) :].partition("/")
    if boot != _boot_id():
        return True  # a process of an earlier boot of this machine
    pid_text, _, start = rest.partition("/")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # exists, under another user
    fields = _stat_fields(pid)
    if fields[:1] == ["Z"]:
        return True  # killed, not yet reaped by its parent
    return start not in ("", "-") and len(fields) > 19 and fields[19] != start
