"""What every Modal function runs: open the State API, run the chunk, close. No Modal imports here,
so tests call it directly with a real database."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from typing import Any

from shared.observability import init_observability
from shared.state_api import TaskRef
from shared.state_factory import open_state_api
from shared.worker import run_chunk


async def run_function_chunk(
    function_name: str, tasks: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Start, run and complete or fail ``tasks`` with the step handler ``function_name``."""
    init_observability("worker", function=function_name)
    refs = [TaskRef.from_json(t) for t in tasks]
    api = await open_state_api()
    try:
        report = await run_chunk(api, function_name, refs)
    finally:
        await api.close()
    return asdict(report)
