"""A local stand-in for an ASYNC provider: accepts an item, answers later on its callback URL.

``step_async`` sends its items here. Like a real provider (a Clay table's HTTP API column, an Exa
Webset, a bulk job), the emulator answers over real HTTP, later, with a JSON body, and it can
misbehave on purpose, deterministically per item (``item_id.int % n == 0`` selects about 1/n):

``delay_ms`` (default 50)        how long before it calls back
``fail_every`` n                 answers {"error": ..., "retryable": true} instead of a result
``drop_every`` n                 never calls back (the row's callback deadline retries it)
``duplicate_every`` n            calls back twice with the same body
``fault_attempts`` k             the faults above hit attempts 1..k only (default: every attempt)

It lives in the worker's process (the local pool keeps its event loop running until the batch is
done), so it needs no server of its own. A callback that cannot be delivered is retried a few
times with backoff, as providers do.

Callbacks due are queued and sent by at most ``connections`` senders, each over one kept-alive
HTTP/1.1 connection, as a provider's webhook sender does: a burst waits its turn instead of opening
hundreds of connections at once (a busy receiver's accept queue overflows), and the receiver gets
whole bursts to apply in one write. A sender stops, closing its connection, when the queue is
empty, so nothing is left open when the event loop ends.

The senders speak just enough HTTP/1.1 for this: one POST at a time per connection, and only the
answer's status matters. An answer without a Content-Length (chunked, or until close) ends its
connection after the status line. A callback costs the sending side about 40 us of CPU so, against
150 us with aiohttp and 1,300 us with httpx, whose pool bookkeeping grows with its queue: at
thousands of callbacks a second, in the worker's process, that was most of a core.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import ssl
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from shared.errors import ConfigurationError

log = logging.getLogger(__name__)

DELIVERY_ATTEMPTS = 5
# The senders' connections: as many callbacks in flight at once, so the receiver's bursts (and its
# bulk writes) are up to this big. bench/callbacks.py, 10,000 items on 2 cores: 32 connections
# 1,300-1,400 callbacks/s, 64 1,600-1,850/s, 128 2,100-2,250/s (p50 latency 20 -> 80 ms).
CONNECTIONS = 128
TIMEOUT_SECONDS = 10.0
# An answer's status line and headers; a receiver's are a few hundred bytes.
MAX_HEAD_BYTES = 64 * 1024


class DeliveryError(Exception):
    """A callback could not be sent, or its answer could not be read."""


class _Delivery:
    __slots__ = ("body", "copies", "url")

    def __init__(self, url: str, body: bytes, copies: int) -> None:
        self.url, self.body, self.copies = url, body, copies


class Emulator:
    """Pending callbacks of this process; ``submit`` returns at once with a request id."""

    def __init__(self, connections: int = CONNECTIONS) -> None:
        self.connections = connections
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: deque[_Delivery] = deque()
        self._timers: dict[_Delivery, asyncio.TimerHandle] = {}  # not yet due
        self._senders: set[asyncio.Task[None]] = set()

    def submit(
        self,
        callback_url: str,
        item: Mapping[str, Any],
        *,
        item_id: uuid.UUID,
        attempt: int,
        config: Mapping[str, Any],
    ) -> str:
        request_id = f"emu-{uuid.uuid4().hex[:12]}"
        plan = _plan(config, item_id, attempt)
        if plan.copies:
            delivery = _Delivery(callback_url, _body(item, request_id, plan.fail), plan.copies)
            loop = self._bind_loop()
            if plan.delay > 0:
                self._timers[delivery] = loop.call_later(plan.delay, self._due, delivery)
            else:
                self._enqueue(delivery)
        return request_id

    def _due(self, delivery: _Delivery) -> None:
        self._timers.pop(delivery, None)
        self._enqueue(delivery)

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # A new event loop (another run in this process): what the old one held is gone.
            self._loop = loop
            self._queue.clear()
            self._timers.clear()
            self._senders.clear()
        return loop

    def _enqueue(self, delivery: _Delivery) -> None:
        self._queue.append(delivery)
        if len(self._senders) < max(1, self.connections):
            sender = asyncio.get_running_loop().create_task(self._send_queued())
            self._senders.add(sender)

    async def _send_queued(self) -> None:
        me = asyncio.current_task()
        connection = _Connection()
        try:
            while self._queue:
                delivery = self._queue.popleft()
                try:
                    for _ in range(delivery.copies):
                        await self._post(connection, delivery)
                except Exception:  # a bug here must not strand the callbacks queued behind it
                    log.exception("emulator: a callback could not be sent")
                    connection.close()
        finally:
            connection.close()
            self._senders.discard(me)

    async def _post(self, connection: _Connection, delivery: _Delivery) -> None:
        wait = 0.2
        for attempt in range(1, DELIVERY_ATTEMPTS + 1):
            try:
                status = await connection.post(delivery.url, delivery.body)
            except (OSError, ValueError, DeliveryError, asyncio.TimeoutError) as exc:
                log.debug("emulator: callback not delivered (%r), attempt %d", exc, attempt)
            else:
                if status < 500:
                    return  # 2xx applied, 4xx refused: either way the provider is done
            await asyncio.sleep(wait)
            wait *= 2
        log.warning("emulator: gave up delivering a callback after %d attempts", DELIVERY_ATTEMPTS)

    async def aclose(self) -> None:
        """Drop what is not yet sent and stop the senders."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._queue.clear()
        senders = list(self._senders)
        for sender in senders:
            sender.cancel()
        await asyncio.gather(*senders, return_exceptions=True)


class _Connection:
    """One kept-alive HTTP/1.1 connection of a sender, opened on first use and again whenever the
    last one ended (the server closed it, an error, another origin)."""

    def __init__(self) -> None:
        self._origin: tuple[str, str, int] | None = None
        self._protocol: _Protocol | None = None

    async def post(self, url: str, body: bytes) -> int:
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), parts.hostname
        if scheme not in ("http", "https") or not host:
            raise DeliveryError(f"not an http(s) URL: {scheme}://...")
        origin = (scheme, host, parts.port or (443 if scheme == "https" else 80))
        protocol = self._protocol
        if protocol is None or protocol.closed or origin != self._origin:
            self.close()
            protocol = await self._open(origin)
        target = parts.path or "/"
        if parts.query:
            target = f"{target}?{parts.query}"
        status, reusable = await protocol.post(target, parts.netloc, body)
        if not reusable:
            self.close()
        return status

    async def _open(self, origin: tuple[str, str, int]) -> _Protocol:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        context = _tls_context() if scheme == "https" else None
        _, protocol = await asyncio.wait_for(
            loop.create_connection(_Protocol, host, port, ssl=context), TIMEOUT_SECONDS
        )
        self._origin, self._protocol = origin, protocol
        return protocol

    def close(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
        self._protocol = None


class _Protocol(asyncio.Protocol):
    """Sends one request at a time and reads the status of its answer, and its body when the
    answer gives a Content-Length (so the connection can carry the next one)."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bool]] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._answer: tuple[int, bool] | None = None  # status, reusable: the body still to read
        self._body_left = 0
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    async def post(self, target: str, host: str, body: bytes) -> tuple[int, bool]:
        if self._transport is None or self.closed:
            raise DeliveryError("connection closed")
        if self._buffer or self._answer is not None:  # bytes no request asked for
            self.close()
            raise DeliveryError("an answer nobody asked for")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[tuple[int, bool]] = loop.create_future()
        self._waiter = waiter
        self._timer = loop.call_later(TIMEOUT_SECONDS, self._timed_out)
        self._transport.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nUser-Agent: enrich-emulator\r\n\r\n%s"
            % (target.encode("ascii"), host.encode("ascii"), len(body), body)
        )
        try:
            return await waiter
        finally:
            self._timer.cancel()
            self._waiter = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._read()
        except DeliveryError as exc:
            self._fail(exc)

    def _read(self) -> None:
        while self._waiter is not None and not self._waiter.done():
            if self._answer is None:
                end = self._buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buffer) > MAX_HEAD_BYTES:
                        raise DeliveryError("an answer's head without an end")
                    return
                head = bytes(self._buffer[:end])
                del self._buffer[: end + 4]
                status, length, keep_alive = _parse_head(head)
                if 100 <= status < 200:
                    continue  # an interim answer: the real one follows
                if length is None:  # its body runs until the server closes: take the status
                    self._waiter.set_result((status, False))
                    self.close()
                    return
                self._answer, self._body_left = (status, keep_alive), length
            taken = min(self._body_left, len(self._buffer))
            del self._buffer[:taken]
            self._body_left -= taken
            if self._body_left:
                return
            answer, self._answer = self._answer, None
            self._waiter.set_result(answer)

    def _timed_out(self) -> None:
        self._fail(asyncio.TimeoutError())

    def _fail(self, exc: BaseException) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(DeliveryError(f"connection lost: {exc or 'closed'}"))

    def close(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.close()


@functools.cache
def _tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


def _parse_head(head: bytes) -> tuple[int, int | None, bool]:
    """An answer's status, its body's length (None: not given, or chunked), and whether the
    connection may carry another request."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise DeliveryError("not an HTTP/1.x answer")
    status = int(parts[1])
    keep_alive = parts[0] != b"HTTP/1.0"
    length: int | None = 0 if status in (204, 304) or 100 <= status < 200 else None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length" and length is None:
            if not value.isdigit():
                raise DeliveryError("a malformed Content-Length")
            length = int(value)
        elif name == b"transfer-encoding" and value != b"identity":
            length = None  # chunked: not read here; the connection ends with the status
            keep_alive = False
        elif name == b"connection":
            keep_alive = value == b"keep-alive" or (keep_alive and value != b"close")
    return status, length, keep_alive


class _Plan:
    def __init__(self, delay: float, copies: int, fail: bool) -> None:
        self.delay, self.copies, self.fail = delay, copies, fail


def _every(config: Mapping[str, Any], key: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"config.{key} must be an integer >= 1, got {value!r}")
    return value


def _plan(config: Mapping[str, Any], item_id: uuid.UUID, attempt: int) -> _Plan:
    delay_ms = config.get("delay_ms", 50)
    if isinstance(delay_ms, bool) or not isinstance(delay_ms, int | float) or delay_ms < 0:
        raise ConfigurationError(f"config.delay_ms must be a number >= 0, got {delay_ms!r}")
    fault_attempts = config.get("fault_attempts")
    faulty = fault_attempts is None or attempt <= int(fault_attempts)

    def hit(key: str) -> bool:
        every = _every(config, key)
        return faulty and every is not None and item_id.int % every == 0

    copies = 0 if hit("drop_every") else 2 if hit("duplicate_every") else 1
    return _Plan(float(delay_ms) / 1000, copies, hit("fail_every"))


def _body(item: Mapping[str, Any], request_id: str, fail: bool) -> bytes:
    if fail:
        body = {"request_id": request_id, "error": "emulated provider failure", "retryable": True}
    else:
        body = {"request_id": request_id, "provider": "emulator", "name": item.get("name")}
    return json.dumps(body, default=str).encode()


# One per process: the local pool's handlers share it.
EMULATOR = Emulator()
