"""Acknowledged transitions survive a crash of the database server (issue 11, item 5).

The embedded cluster runs with synchronous_commit = off for speed. A completion the worker was told
"ok" must nevertheless be on disk: otherwise a crash rolls it back and the step (a paid call) runs
again. The test makes the gap wide and certain: the WAL writer flushes only every 10 s, so anything
committed asynchronously since the last checkpoint is lost by an immediate shutdown (a crash).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg

from shared.db.embedded import EmbeddedPostgres
from shared.db.migrate import migrate
from shared.pg_state import PgStateAPI
from shared.settings import Settings
from shared.state_api import StepResult
from tests.contract import TWO_STEPS, company


def crash_and_restart(cluster: EmbeddedPostgres) -> None:
    """pg_ctl stop -m immediate (no shutdown checkpoint: recovery replays the WAL), then start."""
    pg_ctl = str(cluster.bin_dir / "pg_ctl")
    result = cluster._run_pg([pg_ctl, "stop", "-D", str(cluster.data_dir), "-m", "immediate"])
    assert result.returncode == 0, result.stderr
    cluster.start()


def test_acknowledged_completions_survive_an_immediate_crash(short_home: Path) -> None:
    cluster = EmbeddedPostgres(home=short_home, settings=Settings(enrich_home=short_home))
    dsn = cluster.start()
    asyncio.run(migrate(dsn))
    with psycopg.connect(dsn, autocommit=True) as admin:
        assert admin.execute("show synchronous_commit").fetchone() == ("off",)
        admin.execute("alter system set wal_writer_delay = '10s'")
        admin.execute("select pg_reload_conf()")

    async def complete_one_by_one() -> list[tuple[object, ...]]:
        async with await PgStateAPI.open(dsn) as api:
            batch_id = await api.create_batch(TWO_STEPS, [company(i) for i in range(5)])
            claimed = [c.task for c in await api.claim(10, batch_ids=[batch_id])]
            await api.start(claimed)
            with psycopg.connect(dsn, autocommit=True) as admin:
                admin.execute("checkpoint")  # everything so far is on disk
            for task in claimed:  # five small, separate acknowledgements
                [outcome] = await api.complete([StepResult(task, {"domain": "x.example"})])
                assert outcome.ok
            return [(t.item_id,) for t in claimed]

    acked = asyncio.run(complete_one_by_one())
    crash_and_restart(cluster)

    with psycopg.connect(dsn, autocommit=True) as conn:
        completed = conn.execute(
            "select item_id from workflow_states where step_name = %s and status = 'COMPLETED'",
            (TWO_STEPS[0],),
        ).fetchall()
        assert sorted(completed) == sorted(acked)
        # Each completion's next step, seeded in the same transaction, survived with it.
        seeded = conn.execute(
            "select count(*) from workflow_states where step_name = %s", (TWO_STEPS[1],)
        ).fetchone()
        assert seeded == (5,)


def test_claims_and_starts_survive_an_immediate_crash(short_home: Path) -> None:
    """A lost claim would hand its attempt number out twice; a lost start would refuse the
    completion of a step that ran."""
    cluster = EmbeddedPostgres(home=short_home, settings=Settings(enrich_home=short_home))
    dsn = cluster.start()
    asyncio.run(migrate(dsn))
    with psycopg.connect(dsn, autocommit=True) as admin:
        admin.execute("alter system set wal_writer_delay = '10s'")
        admin.execute("select pg_reload_conf()")

    async def claim_and_start() -> None:
        async with await PgStateAPI.open(dsn) as api:
            batch_id = await api.create_batch(TWO_STEPS, [company(i) for i in range(4)])
            with psycopg.connect(dsn, autocommit=True) as admin:
                admin.execute("checkpoint")
            claimed = [c.task for c in await api.claim(2, batch_ids=[batch_id])]
            assert all(s.ok for s in await api.start(claimed))
            await api.claim(2, batch_ids=[batch_id])

    asyncio.run(claim_and_start())
    crash_and_restart(cluster)

    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "select status::text, attempt from workflow_states order by status"
        ).fetchall()
    assert sorted(rows) == [("IN_PROGRESS", 1)] * 2 + [("QUEUED", 1)] * 2
