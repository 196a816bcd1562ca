"""``enrich run ... --steps normalize_domain,step_async`` end to end: the local receiver starts by
itself, the provider emulator calls back over real HTTP, and faults it injects (failures, dropped
and duplicated callbacks) still end with every item completed exactly once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import psycopg
from psycopg.types.json import Jsonb

from shared.cli.dev_commands import free_port

ENRICH = Path(sys.executable).parent / "enrich"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "companies.csv"
RUN_STEP_ASYNC = [str(ENRICH), "run", str(EXAMPLE), "--steps", "step_async"]


def test_step_async_runs_to_completion_through_real_callbacks(dsn: str, tmp_path: Path) -> None:
    faults = {
        "delay_ms": 20,
        "fail_every": 5,
        "drop_every": 7,
        "duplicate_every": 3,
        "fault_attempts": 1,
        "callback_timeout_seconds": 1,
        "backoff_seconds": 0,
    }
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "update enrichment_registry set config = config || %s where step_name = 'step_async'",
            (Jsonb(faults),),
        )
    env = {**os.environ, "DATABASE_URL": dsn, "ENRICH_HOME": str(tmp_path)}
    done = subprocess.run(
        [str(ENRICH), "run", str(EXAMPLE), "--steps", "normalize_domain,step_async"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    with psycopg.connect(dsn, autocommit=True) as conn:
        states = conn.execute(
            "select status::text, count(*) from workflow_states where step_name = 'step_async'"
            " group by 1"
        ).fetchall()
        results = conn.execute("select count(*), count(distinct item_id) from step_async_results")
        retried = conn.execute(
            "select meta -> 'last_error' ->> 'kind', count(*) from workflow_states"
            " where step_name = 'step_async' and attempt > 1 group by 1"
        ).fetchall()
    assert states == [("COMPLETED", 300)]
    assert results.fetchone() == (300, 300)  # duplicated callbacks wrote nothing twice
    kinds: dict[str, int] = dict(retried)
    assert kinds.get("worker_error", 0) > 0  # failure callbacks were retried
    assert kinds.get("callback_timeout", 0) > 0  # dropped callbacks hit their deadline


class Tunnel:
    """A TCP forwarder standing in for a tunnel (ngrok, cloudflared) to the local receiver:
    listens on its own port, forwards each connection to ``target_port``, counts them."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> Tunnel:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._forward, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


def test_run_with_a_fixed_callback_port_behind_a_tunnel(dsn: str, tmp_path: Path) -> None:
    # What running clay_enrich locally needs: providers reach the receiver through a public URL
    # (ENRICH_CALLBACK_BASE_URL) forwarded to a known local port (--callback-port).
    port = free_port()
    with Tunnel(port) as tunnel:
        env = {
            **os.environ,
            "DATABASE_URL": dsn,
            "ENRICH_HOME": str(tmp_path),
            "ENRICH_CALLBACK_BASE_URL": f"http://127.0.0.1:{tunnel.port}",
        }
        done = subprocess.run(
            [*RUN_STEP_ASYNC, "--callback-port", str(port)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        assert done.returncode == 0, done.stderr
        assert tunnel.connections > 0  # the callbacks came through the tunnel
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.execute("select count(*) from step_async_results")
        assert cur.fetchone() == (300,)


def test_run_with_a_callback_port_in_use_says_so(dsn: str, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "DATABASE_URL": dsn, "ENRICH_HOME": str(tmp_path)}
        done = subprocess.run(
            [*RUN_STEP_ASYNC, "--callback-port", str(port)],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    assert done.returncode == 2, done.stderr
    assert f"127.0.0.1:{port}" in done.stderr and "--callback-port" in done.stderr
    assert "Traceback" not in done.stderr and "Errno" not in done.stderr
    assert "resume with: enrich run --batch" in done.stderr  # the batch was imported
