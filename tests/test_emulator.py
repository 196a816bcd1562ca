"""The local provider emulator behind step_async: it answers over real HTTP after delay_ms, and
misbehaves on purpose, deterministically per item."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from shared.errors import ConfigurationError
from shared.providers.emulator import Emulator, _plan
from shared.steps.async_shell import step_async
from shared.steps.base import StepContext


class Receiver:
    """A bare asyncio HTTP server on 127.0.0.1 that records the JSON bodies posted to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        self.bodies.append(json.loads(await reader.readexactly(length)))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/callbacks/token"


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    rec.server = await asyncio.start_server(rec._handle, "127.0.0.1", 0)
    try:
        yield rec
    finally:
        rec.server.close()


async def poll(predicate: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "not within the deadline"
        await asyncio.sleep(0.01)


def item(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


def test_faults_pick_the_same_items_every_time() -> None:
    config = {"fail_every": 3, "drop_every": 5, "duplicate_every": 7, "fault_attempts": 1}
    assert _plan(config, item(3), 1).fail and not _plan(config, item(4), 1).fail
    assert _plan(config, item(5), 1).copies == 0
    assert _plan(config, item(7), 1).copies == 2
    assert _plan(config, item(5), 2).copies == 1  # faults hit the first attempt only
    with pytest.raises(ConfigurationError, match="drop_every"):
        _plan({"drop_every": 0}, item(1), 1)


async def test_it_calls_back_over_http_with_a_result_a_failure_or_twice(
    receiver: Receiver,
) -> None:
    emulator = Emulator()
    config = {"delay_ms": 10, "fail_every": 2, "duplicate_every": 3}
    try:
        ids = [
            emulator.submit(
                receiver.url, {"name": f"n{i}"}, item_id=item(i), attempt=1, config=config
            )
            for i in (1, 2, 3)
        ]
        await poll(lambda: len(receiver.bodies) == 4)
    finally:
        await emulator.aclose()
    by_request: dict[str, list[dict[str, Any]]] = {}
    for body in receiver.bodies:
        by_request.setdefault(body["request_id"], []).append(body)
    assert by_request[ids[0]] == [{"request_id": ids[0], "provider": "emulator", "name": "n1"}]
    assert by_request[ids[1]][0]["error"] and by_request[ids[1]][0]["retryable"] is True
    assert len(by_request[ids[2]]) == 2


async def test_step_async_without_a_receiver_is_a_clear_error() -> None:
    async def beat() -> None:
        return None

    ctx = StepContext(uuid.uuid4(), uuid.uuid4(), "step_async", 1, {}, beat)
    with pytest.raises(ConfigurationError, match="no callback receiver"):
        await step_async({}, ctx)
