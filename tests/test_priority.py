"""A batch's ``priority`` (issue 9, item 1) is set where batches are created: ``enrich batch
create`` and ``enrich run`` (``--priority N``, default 0) and a plain insert as a Studio user, who
may also change it on their own batches. What it does at claim time: contract/test_fairness.py."""

from __future__ import annotations

from pathlib import Path
from uuid import UUID, uuid4

import psycopg
import pytest
from click.testing import CliRunner, Result

from shared.cli.main import main
from tests.contract import Conn
from tests.test_rls import CLIENT_A, CLIENT_B, app_metadata_claims, as_role


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "companies.csv"
    path.write_text("Company Name,Website\nAcme,acme.com\n", encoding="utf-8")
    return path


def enrich(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def priority_of(dsn: str, batch_id: UUID) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("select priority from batches where id = %s", (batch_id,)).fetchone()
    assert row is not None
    return int(row[0])


def test_batch_create_takes_a_priority(db: str, csv_file: Path) -> None:
    plain = enrich("batch", "create", str(csv_file), "--steps", "normalize_domain")
    urgent = enrich(
        "batch", "create", str(csv_file), "--steps", "normalize_domain", "--priority", "7"
    )

    assert plain.exit_code == 0 and urgent.exit_code == 0, (plain.output, urgent.output)
    assert priority_of(db, UUID(plain.stdout.split()[-1])) == 0
    assert priority_of(db, UUID(urgent.stdout.split()[-1])) == 7


def test_a_priority_out_of_range_is_a_usage_error(db: str, csv_file: Path) -> None:
    result = enrich(
        "batch", "create", str(csv_file), "--steps", "normalize_domain", "--priority", "5000"
    )
    assert result.exit_code == 2
    assert "'--priority': 5000 is not in the range" in result.output


def test_run_takes_a_priority_for_a_new_batch_only(db: str, csv_file: Path) -> None:
    ran = enrich("run", str(csv_file), "--steps", "normalize_domain", "--priority", "-3")
    assert ran.exit_code == 0, ran.output
    with psycopg.connect(db) as conn:
        row = conn.execute("select id, priority from batches").fetchone()
    assert row is not None and row[1] == -3

    resumed = enrich("run", "--batch", str(row[0]), "--priority", "2")
    assert resumed.exit_code == 2
    assert "--priority belongs to a new batch" in resumed.output


async def test_a_studio_user_sets_the_priority_of_its_own_batches(conn: Conn) -> None:
    theirs = uuid4()
    await conn.execute(
        "insert into batches (id, client_id, blueprint) values (%s, %s, '[\"normalize_domain\"]')",
        (theirs, CLIENT_B),
    )
    async with as_role(conn, "authenticated", app_metadata_claims(CLIENT_A)):
        cur = await conn.execute(
            "insert into batches (blueprint, priority) values ('[\"normalize_domain\"]', 4)"
            " returning id, priority"
        )
        row = await cur.fetchone()
        assert row is not None and row[1] == 4
        cur = await conn.execute("update batches set priority = 9 where id = %s", (row[0],))
        assert cur.rowcount == 1
        # RLS: another client's batch is not there to reorder.
        cur = await conn.execute("update batches set priority = 9 where id = %s", (theirs,))
        assert cur.rowcount == 0
