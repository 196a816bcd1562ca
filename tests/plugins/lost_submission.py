"""An ASYNC step handler whose process dies after the provider accepted the item but before the
submission is recorded, for ``tests/test_async_faults.py`` (``enrich run`` as a subprocess).

``ENRICH_STEP_MODULES=tests.plugins.lost_submission`` adds the handler ``lost_submission``. Each
call plays the provider accepting the item: it appends ``{"item_id", "attempt", "callback_url",
"pid"}`` as one JSON line to the file ``config.provider_log`` (fsynced: from here on the provider
has it, and will answer on that URL). Then:

- attempts ``<= config.crash_attempts`` (default 0) wait until ``config.crash_after`` (default 1)
  such calls of this process have been made, and the last of them SIGKILLs its own process: the
  worker never gets to ``submit``, and every one of those rows stays IN_PROGRESS on its start lease;
- later attempts return ``Submitted`` at once (request id ``req-<item>-<attempt>``), recorded as
  usual.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Mapping
from typing import Any

from shared.steps.base import StepContext, StepHandler, Submitted

_accepted_before_crash = 0


def _provider_accepts(path: str, line: Mapping[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


async def lost_submission(raw: Mapping[str, Any], ctx: StepContext) -> dict[str, Any] | Submitted:
    global _accepted_before_crash
    _provider_accepts(
        str(ctx.config["provider_log"]),
        {
            "item_id": str(ctx.item_id),
            "attempt": ctx.attempt,
            "callback_url": ctx.callback_url,
            "pid": os.getpid(),
        },
    )
    if ctx.attempt <= int(ctx.config.get("crash_attempts", 0)):
        _accepted_before_crash += 1
        if _accepted_before_crash >= int(ctx.config.get("crash_after", 1)):
            os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.Event().wait()  # until the last of them kills the process
    return Submitted(f"req-{ctx.item_id}-{ctx.attempt}")


HANDLERS: dict[str, StepHandler] = {"lost_submission": lost_submission}
