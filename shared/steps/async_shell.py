"""``step_async``: the built-in ASYNC shell. It hands the item to the local provider emulator
(``shared.providers.emulator``) with its callback URL and returns at once; the emulator answers
over HTTP after ``config.delay_ms``, and the callback completes the row."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from shared.errors import ConfigurationError
from shared.providers.emulator import EMULATOR
from shared.steps.base import StepContext, Submitted


async def step_async(raw: Mapping[str, Any], ctx: StepContext) -> Submitted:
    if ctx.callback_url is None:
        raise ConfigurationError(
            "step_async is answered by callback, and no callback receiver runs here: "
            "run it with enrich run or enrich serve"
        )
    request_id = EMULATOR.submit(
        ctx.callback_url, raw, item_id=ctx.item_id, attempt=ctx.attempt, config=ctx.config
    )
    return Submitted(request_id)
