"""Small files only their owner may read: the private cluster's auth files and stop note, and
``enrich dev``'s state (the workers' token), pid files.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path


def write_private_file(path: Path, text: str, owner: pwd.struct_passwd | None = None) -> None:
    """Replace ``path`` atomically with ``text``, mode 0600 (also when it existed with a wider
    one), owned by ``owner`` when given (as root: the cluster's OS user).

    Written to a fresh temporary file beside it (O_EXCL, O_NOFOLLOW: a planted symlink cannot
    redirect the write) then renamed over it, so a reader never sees half a file.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crashed process of the same pid
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with open(fd, "w") as fh:  # closes fd
            if owner is not None:
                os.fchown(fh.fileno(), owner.pw_uid, owner.pw_gid)
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
