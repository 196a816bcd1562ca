"""``enrich batch create|list`` and ``enrich status`` via click's CliRunner, on a test database."""

from __future__ import annotations

import json
from pathlib import Path
from uuid import UUID

import psycopg
import pytest
from click.testing import CliRunner, Result

from shared.cli.main import main

CSV = (
    "Company Name,Website URL,Funding Stage\n"
    "Acme Inc,acme.com,Seed\n"
    "Beta Labs,beta.io,\n"
    "Gamma,gamma.co,Series A\n"
)


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "companies.csv"
    path.write_text(CSV, encoding="utf-8")
    return path


def enrich(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def table_counts(dsn: str) -> tuple[int, int, int]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "select (select count(*) from batches), (select count(*) from batch_items),"
            " (select count(*) from workflow_states)"
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def create(csv_path: Path, *extra: str) -> UUID:
    result = enrich("batch", "create", str(csv_path), "--steps", "step_a,step_b", *extra)
    assert result.exit_code == 0, result.stderr
    return UUID(result.stdout.strip().splitlines()[-1])


def test_create_prints_the_batch_id_alone_and_the_mapping_on_stderr(
    db: str, csv_file: Path
) -> None:
    result = enrich("batch", "create", str(csv_file), "--steps", "step_a,step_b")
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    batch_id = UUID(lines[-1])
    assert "Company Name" in result.stderr
    assert "unmapped" in result.stderr
    assert "funding_stage" in result.stderr
    assert "imported 3 row(s)" in result.stderr
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "select name, client_id, item_count from batches where id = %s", (batch_id,)
        ).fetchone()
    assert row == ("companies.csv", UUID(int=0), 3)


def test_create_with_name_and_client(db: str, csv_file: Path) -> None:
    client = "6f1c2d3e-0000-4000-8000-000000000001"
    batch_id = create(csv_file, "--name", "Q3 list", "--client-id", client)
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "select name, client_id from batches where id = %s", (batch_id,)
        ).fetchone()
    assert row == ("Q3 list", UUID(client))


def test_create_refuses_malformed_rows_with_exit_2(db: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("name,website\nA,a.com\nB\nC,c.com,x\n", encoding="utf-8")
    result = enrich("batch", "create", str(path), "--steps", "step_a")
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "2 malformed row(s); nothing was imported" in result.stderr
    assert "line 3" in result.stderr
    assert "line 4" in result.stderr
    assert table_counts(db) == (0, 0, 0)


def test_create_skip_invalid(db: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("name,website\nA,a.com\nB\nC,c.com\n", encoding="utf-8")
    result = enrich("batch", "create", str(path), "--steps", "step_a", "--skip-invalid")
    assert result.exit_code == 0, result.stderr
    UUID(result.stdout.strip().splitlines()[-1])
    assert "skipped rows (1)" in result.stderr
    assert "line 3" in result.stderr
    assert table_counts(db) == (1, 2, 2)


def test_create_unknown_step_exit_2_nothing_written(db: str, csv_file: Path) -> None:
    result = enrich("batch", "create", str(csv_file), "--steps", "step_a,enrich_with_magic")
    assert result.exit_code == 2
    assert "unknown step(s): enrich_with_magic" in result.stderr
    assert (
        "known steps: clay_enrich, clean_company_name, exa_verify, normalize_domain, step_a,"
        " step_async, step_b" in result.stderr
    )
    assert table_counts(db) == (0, 0, 0)


def test_create_empty_and_missing_files(db: str, tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    result = enrich("batch", "create", str(empty), "--steps", "step_a")
    assert result.exit_code == 2
    assert "the file is empty" in result.stderr
    result = enrich("batch", "create", str(tmp_path / "missing.csv"), "--steps", "step_a")
    assert result.exit_code == 2
    assert "no such file" in result.stderr
    assert table_counts(db) == (0, 0, 0)


def test_create_invalid_client_id(db: str, csv_file: Path) -> None:
    result = enrich("batch", "create", str(csv_file), "--steps", "step_a", "--client-id", "acme")
    assert result.exit_code == 2
    assert "not a valid UUID" in result.stderr


def test_status_json_exact_shape(db: str, csv_file: Path) -> None:
    batch_id = create(csv_file)
    result = enrich("status", str(batch_id), "--json")
    assert result.exit_code == 0, result.stderr
    zero = {"PENDING": 0, "QUEUED": 0, "IN_PROGRESS": 0, "COMPLETED": 0, "FAILED": 0}
    assert json.loads(result.stdout) == {
        "batch_id": str(batch_id),
        "status": "PENDING",
        "items": 3,
        "steps": {"step_a": {**zero, "PENDING": 3}, "step_b": zero},
        "awaiting_callback": {"step_a": 0, "step_b": 0},
        "skipped": {"step_a": 0, "step_b": 0},
        "cached": {"step_a": 0, "step_b": 0},
        "cost": json.loads(result.stdout)["cost"],  # its shape: tests of the ledger
    }
    assert list(json.loads(result.stdout)["steps"]) == ["step_a", "step_b"]


def test_status_human_table(db: str, csv_file: Path) -> None:
    batch_id = create(csv_file)
    result = enrich("status", str(batch_id))
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert str(batch_id) in out
    assert "PENDING" in out
    assert "items 3  completed 0  failed 0" in out
    assert "step_a" in out
    assert "step_b" in out
    assert "IN_PROGRESS" in out


def test_status_unknown_batch_exit_1(db: str) -> None:
    missing = "00000000-0000-4000-8000-00000000dead"
    result = enrich("status", missing)
    assert result.exit_code == 1
    assert f"batch {missing} not found" in result.stderr
    result = enrich("status", missing, "--json")
    assert result.exit_code == 1
    assert result.stdout == ""


def test_status_invalid_uuid(db: str) -> None:
    result = enrich("status", "not-a-uuid")
    assert result.exit_code == 2
    assert "'not-a-uuid' is not a valid UUID" in result.stderr


def test_batch_list(db: str, csv_file: Path) -> None:
    result = enrich("batch", "list", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout) == []
    first = create(csv_file, "--name", "first")
    second = create(csv_file, "--name", "second")
    with psycopg.connect(db) as conn:  # one item failed its first step (set by hand: the hatch)
        conn.execute("set local enrich.allow_direct_state_edits = on")
        conn.execute(
            "update workflow_states set status = 'FAILED' where item_id ="
            " (select id from batch_items where batch_id = %s order by seq limit 1)",
            (first,),
        )
    result = enrich("batch", "list", "--json")
    assert result.exit_code == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [b["batch_id"] for b in listed] == [str(second), str(first)]
    assert {k: listed[1][k] for k in ("name", "status", "items", "completed", "failed")} == {
        "name": "first",
        "status": "PENDING",
        "items": 3,
        "completed": 0,
        "failed": 1,
    }
    assert listed[1]["steps"] == ["step_a", "step_b"]
    human = enrich("batch", "list")
    assert human.exit_code == 0
    assert str(first) in human.stdout
    assert "second" in human.stdout


async def test_large_imports_show_progress_on_a_terminal(dsn: str, tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from shared.cli.batch_commands import PROGRESS_BAR_BYTES, import_with_progress

    big = tmp_path / "big.csv"
    with big.open("w", encoding="utf-8") as out:
        out.write("name,website,notes\n")
        row = 0
        while out.tell() < PROGRESS_BAR_BYTES + 100_000:
            out.write(f"Company {row},company{row}.com,{'x' * 60}\n")
            row += 1
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=100)

    report = await import_with_progress(
        console, dsn, big, "step_a", client_id=None, name="big", skip_invalid=False
    )

    assert report.rows_imported == row
    assert "importing big.csv" in screen.getvalue()
