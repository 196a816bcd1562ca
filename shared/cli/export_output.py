"""Where ``enrich export`` writes: a file replaced atomically, stdout, or a device in place.

A file is written to a temporary name beside it and renamed at the end: a failed export leaves
any previous file untouched and no partial one. A symbolic link is followed: its target is
replaced and the link kept, as ``>`` would; a link that leads round in a loop is refused, never
replaced by a file. ``check_output`` tries all of this before the database is asked.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import io
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol
from uuid import uuid4

from shared.errors import InvalidInput


class TextSink(Protocol):
    def write(self, text: str, /) -> object: ...


def _destination(target: str) -> tuple[Path, bool]:
    """Where a file export really goes, and whether it is written in place.

    A symlink is followed (its target is replaced, the link kept, as ``>`` would; a dangling
    link's target is created). A device, a FIFO or a socket (``/dev/null``, ``/dev/stdout``,
    ``<(...)``) is written in place: renaming a file over it would replace ``/dev/null`` itself.
    """
    try:
        mode = os.stat(target).st_mode  # through links, /proc's magic ones (/dev/stdout) included
    except OSError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        return Path(target), True
    # realpath stops at a link it cannot resolve (a loop): renaming over that would replace the
    # link itself with the export.
    resolved = Path(os.path.realpath(target))
    if resolved.is_symlink():
        raise OSError(errno.ELOOP, "a symbolic link that leads round in a loop")
    return resolved, False


def _temporary(path: Path) -> Path:
    """The temporary file beside ``path``: hidden, unique, and never a name too long."""
    name = path.name if len(os.fsencode(path.name)) <= 200 else "export"
    return path.with_name(f".{name}.{uuid4().hex[:12]}.tmp")


def check_output(target: str) -> None:
    """Raise ``InvalidInput`` when an export could not write ``target``, with nothing left behind.

    It does what ``open_output`` will do (create the temporary file beside the target) and
    undoes it, rather than guess from permission bits: ``os.access`` says yes to root on a
    read-only or immutable directory, and knows nothing of names too long.
    """
    if target == "-":
        return
    parent = Path(target).parent
    if not parent.is_dir():
        raise InvalidInput(f"cannot write {target}: no such directory {str(parent)!r}")
    try:
        path, in_place = _destination(target)
        if in_place:
            if not os.access(path, os.W_OK):
                raise OSError(errno.EACCES, os.strerror(errno.EACCES))
            return
        if len(os.fsencode(path.name)) > os.pathconf(path.parent, "PC_NAME_MAX"):
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        tmp = _temporary(path)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        tmp.unlink()
    except OSError as exc:
        raise InvalidInput(f"cannot write {target}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def open_output(target: str) -> Iterator[TextSink]:
    """A UTF-8 text sink to ``target`` (``-``: stdout), replacing the file atomically on success.

    Stdout gets UTF-8 whatever the locale, with no newline translation; its bytes go straight to
    ``sys.stdout.buffer`` (no wrapper that could close it). A device or a FIFO is written in
    place (see ``_destination``).
    """
    if target == "-":
        sys.stdout.flush()
        binary: io.BufferedWriter | None = getattr(sys.stdout, "buffer", None)
        if binary is None:  # a replaced sys.stdout without bytes underneath
            yield sys.stdout
            sys.stdout.flush()
            return
        yield codecs.getwriter("utf-8")(binary)
        binary.flush()
        return
    path, in_place = _destination(target)
    if in_place:
        with path.open("w", encoding="utf-8", newline="") as out:
            yield out
        return
    with replaced_file(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as out:
        yield out


@contextlib.contextmanager
def open_binary_output(target: str) -> Iterator[Path]:
    """A path to write ``target``'s bytes to (an .xlsx), renamed over it on success."""
    path, in_place = _destination(target)
    if in_place:
        yield path
        return
    with replaced_file(path) as tmp:
        yield tmp


@contextlib.contextmanager
def replaced_file(path: Path) -> Iterator[Path]:
    """A new temporary file beside ``path``, synced and renamed over it once the block succeeds.

    It is created with mode 0666 minus the umask, like any new file, so the result gets the
    permissions ``>`` would give it.
    """
    tmp = _temporary(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


__all__ = ["TextSink", "check_output", "open_binary_output", "open_output", "replaced_file"]
