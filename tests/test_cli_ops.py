"""``enrich export``, ``enrich retry`` and ``enrich cancel`` via click's CliRunner, on a test DB.

Batches are created and driven through the State API (claim, start, complete, fail), so the
statuses, errors and result rows are the ones real workers leave behind.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from click.testing import CliRunner, Result

from shared.cli.main import main
from shared.pg_state import PgStateAPI
from shared.state_api import StepFailure, StepResult, TaskRef

MISSING = "00000000-0000-4000-8000-00000000dead"

ITEMS: list[dict[str, Any]] = [
    {"name": "Acme, Inc.", "website": "acme.com"},
    {"name": "Zürich Ünïcødé 株式会社", "website": "zurich.ch", "extra": "only here"},
    {"name": 'He said "hi"\nsecond line', "website": "q.io", "employees": 12},
    {"website": "d.com", "tags": ["x", "y"]},
]
ERROR = 'boom: "quoted", comma\nnewline'
RESULT_A0 = {"slept_ms": 0, "note": "a,b"}
RESULT_A2 = {"slept_ms": 5, "city": "Zürich"}
RESULT_B0 = {
    "score": 0.5,
    "tags": ["x", "y"],
    "detail": {"k": "v", "n": 1},
    "status": "verified",
    "ok": True,
    "none": None,
}

# JSON lines: every input and result key, JSON typed.
COLUMNS = [
    "name",
    "website",
    "extra",
    "employees",
    "tags",
    "step_a.status",
    "step_a.error",
    "step_a.note",
    "step_a.slept_ms",
    "step_a.city",
    "step_b.status",
    "step_b.error",
    "step_b.detail",
    "step_b.none",
    "step_b.ok",
    "step_b.score",
    "step_b.result.status",
    "step_b.tags",
]
# CSV: the same inputs, the item id, then per step readable names; the shells declare no
# outputs, so their result keys are shown.
SHEET_COLUMNS = [
    "name",
    "website",
    "extra",
    "employees",
    "tags",
    "item_id",
    "step_a: status",
    "step_a: error",
    "step_a: note",
    "step_a: slept_ms",
    "step_a: city",
    "step_b: status",
    "step_b: error",
    "step_b: detail",
    "step_b: none",
    "step_b: ok",
    "step_b: score",
    "step_b: result status",
    "step_b: tags",
]
_ = ""
ERROR_LINE = 'boom: "quoted", comma newline'  # a CSV cell holds the error on one line
NOT_REACHED = ["not reached", *[_] * 7]  # step_b: status, error and six result columns


def csv_rows(ids: Sequence[UUID]) -> list[list[str]]:
    return [
        # item 0: both steps completed, with results: no JSON in a cell
        [
            *["Acme, Inc.", "acme.com", _, _, _, str(ids[0])],
            *["completed", _, "a,b", "0", _],
            *["completed", _, "k: v; n: 1", _, "true", "0.5", "verified", "x; y"],
        ],
        # item 1: step_a FAILED (terminal), so step_b never reached
        [
            *["Zürich Ünïcødé 株式会社", "zurich.ch", "only here", _, _, str(ids[1])],
            *["failed", ERROR_LINE, _, _, _],
            *NOT_REACHED,
        ],
        # item 2: step_a completed, step_b running
        [
            *['He said "hi"\nsecond line', "q.io", _, "12", _, str(ids[2])],
            *["completed", _, _, "5", "Zürich"],
            *["running", *[_] * 7],
        ],
        # item 3: still waiting for step_a
        [
            *[_, "d.com", _, _, "x; y", str(ids[3])],
            *["pending", _, _, _, _],
            *NOT_REACHED,
        ],
    ]


@dataclass(frozen=True)
class Seeded:
    batch_id: UUID
    item_ids: list[UUID]  # input order


def enrich(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def item_ids(dsn: str, batch_id: UUID) -> list[UUID]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "select id from batch_items where batch_id = %s order by seq", (batch_id,)
        ).fetchall()
    return [row[0] for row in rows]


async def _drive(dsn: str) -> Seeded:
    """Four items through step_a, step_b: see csv_rows for where each one ends up."""
    api = await PgStateAPI.open(dsn, min_size=1, max_size=1)
    async with api:
        batch_id = await api.create_batch(["step_a", "step_b"], ITEMS, name="ops")
        ids = item_ids(dsn, batch_id)

        def task(n: int, step: str, claimed: Sequence[TaskRef]) -> TaskRef:
            return next(t for t in claimed if t.item_id == ids[n] and t.step_name == step)

        claimed = [c.task for c in await api.claim(10, batch_ids=[batch_id])]
        assert len(claimed) == 4
        released = await api.release([task(3, "step_a", claimed)], "test: not yet")
        assert all(r.ok for r in released)
        claimed = [t for t in claimed if t.item_id != ids[3]]
        assert all(s.ok for s in await api.start(claimed))
        done = await api.complete(
            [
                StepResult(task(0, "step_a", claimed), RESULT_A0),
                StepResult(task(2, "step_a", claimed), RESULT_A2),
            ]
        )
        assert all(d.ok for d in done)
        failed = await api.fail([StepFailure(task(1, "step_a", claimed), ERROR, retryable=False)])
        assert [f.status for f in failed] == ["FAILED"]

        step_b = await api.claim(10, step_names=["step_b"], batch_ids=[batch_id])
        claimed = [c.task for c in step_b]
        assert sorted(t.item_id for t in claimed) == sorted([ids[0], ids[2]])
        assert all(s.ok for s in await api.start(claimed))
        done = await api.complete([StepResult(task(0, "step_b", claimed), RESULT_B0)])
        assert all(d.ok for d in done)
    return Seeded(batch_id, ids)


@pytest.fixture
def seeded(db: str) -> Seeded:
    return asyncio.run(_drive(db))


def create_batch(dsn: str, blueprint: Sequence[str], items: Sequence[Mapping[str, Any]]) -> UUID:
    async def go() -> UUID:
        api = await PgStateAPI.open(dsn, min_size=1, max_size=1)
        async with api:
            return await api.create_batch(blueprint, items)

    return asyncio.run(go())


def read_csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text, newline="")))


def states(dsn: str, batch_id: UUID) -> list[tuple[int, str, str, str | None]]:
    """(item index, step, status, meta error) for every state row of the batch."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "select bi.seq, ws.step_name, ws.status::text, ws.meta ->> 'error'"
            " from workflow_states ws join batch_items bi on bi.id = ws.item_id"
            " where ws.batch_id = %s order by bi.seq, ws.step_index",
            (batch_id,),
        ).fetchall()
    first = min(int(r[0]) for r in rows)
    return [(int(r[0]) - first, r[1], r[2], r[3]) for r in rows]


# enrich export ------------------------------------------------------------------------------------


def test_export_csv_columns_and_values_exact(seeded: Seeded, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    result = enrich("export", str(seeded.batch_id), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert f"exported 4 row(s) x {len(SHEET_COLUMNS)} column(s)" in result.stderr
    assert str(out) in result.stderr
    text = out.read_text(encoding="utf-8")
    rows = read_csv(text)
    assert rows[0] == SHEET_COLUMNS
    assert rows[1:] == csv_rows(seeded.item_ids)
    # The raw text: one header line, quoting only where needed, embedded newlines kept; a row
    # with a joined list ("; ") is fully quoted, as any row holding a ';'.
    assert text.splitlines()[0] == ",".join(SHEET_COLUMNS)
    assert '"Acme, Inc.","acme.com","","","",' in text
    assert '"He said ""hi""\nsecond line",q.io,,12,' in text
    assert ',failed,"boom: ""quoted"", comma newline",' in text
    assert "{" not in text
    assert "\r" not in text
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]  # no temporary file left


def test_export_jsonl_keeps_json_types(seeded: Seeded, tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"  # the format follows the suffix
    result = enrich("export", str(seeded.batch_id), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert "(jsonl)" in result.stderr
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    docs = [json.loads(line) for line in lines]
    assert all(list(doc) == COLUMNS for doc in docs)
    assert docs[0] == {
        "name": "Acme, Inc.",
        "website": "acme.com",
        "extra": None,
        "employees": None,
        "tags": None,
        "step_a.status": "COMPLETED",
        "step_a.error": None,
        "step_a.note": "a,b",
        "step_a.slept_ms": 0,
        "step_a.city": None,
        "step_b.status": "COMPLETED",
        "step_b.error": None,
        "step_b.detail": {"k": "v", "n": 1},
        "step_b.none": None,
        "step_b.ok": True,
        "step_b.score": 0.5,
        "step_b.result.status": "verified",
        "step_b.tags": ["x", "y"],
    }
    assert docs[1]["name"] == "Zürich Ünïcødé 株式会社"
    assert "Zürich Ünïcødé 株式会社" in lines[1]  # UTF-8, not \u escapes
    assert (docs[1]["step_a.status"], docs[1]["step_a.error"]) == ("FAILED", ERROR)
    assert docs[1]["step_b.status"] is None
    assert (docs[2]["employees"], docs[2]["step_b.status"]) == (12, "IN_PROGRESS")
    assert (docs[3]["tags"], docs[3]["step_a.status"]) == (["x", "y"], "PENDING")

    explicit = tmp_path / "explicit.txt"
    result = enrich("export", str(seeded.batch_id), "-o", str(explicit), "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert explicit.read_text(encoding="utf-8").splitlines() == lines


def test_export_to_stdout(seeded: Seeded, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    assert enrich("export", str(seeded.batch_id), "-o", str(out)).exit_code == 0
    result = enrich("export", str(seeded.batch_id), "-o", "-")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == out.read_text(encoding="utf-8")
    assert "exported 4 row(s)" in result.stderr
    assert "to stdout (csv)" in result.stderr
    jsonl = enrich("export", str(seeded.batch_id), "-o", "-", "--format", "jsonl")
    assert jsonl.exit_code == 0, jsonl.stderr
    assert [json.loads(line)["website"] for line in jsonl.stdout.splitlines()] == [
        "acme.com",
        "zurich.ch",
        "q.io",
        "d.com",
    ]


def test_export_status_filter(seeded: Seeded) -> None:
    completed = enrich("export", str(seeded.batch_id), "-o", "-", "--status", "completed")
    assert completed.exit_code == 0, completed.stderr
    expected = csv_rows(seeded.item_ids)
    assert read_csv(completed.stdout) == [SHEET_COLUMNS, expected[0]]
    assert "exported 1 row(s) (completed items)" in completed.stderr
    failed = enrich("export", str(seeded.batch_id), "-o", "-", "--status", "failed")
    assert failed.exit_code == 0, failed.stderr
    assert read_csv(failed.stdout) == [SHEET_COLUMNS, expected[1]]
    everything = enrich("export", str(seeded.batch_id), "-o", "-", "--status", "all")
    assert read_csv(everything.stdout) == [SHEET_COLUMNS, *expected]
    bad = enrich("export", str(seeded.batch_id), "-o", "-", "--status", "running")
    assert bad.exit_code == 2
    assert "'running' is not one of" in bad.stderr


def test_export_input_order_and_first_seen_keys(db: str) -> None:
    # Names in reverse alphabetical order: the export must follow the input, not ids or names.
    items: list[dict[str, Any]] = [{"n": f"item-{99 - i:02d}", "zz": str(i)} for i in range(60)]
    items[10]["b_late"] = "first seen at row 10"
    items[5]["c_mid"] = "first seen at row 5"
    batch_id = create_batch(db, ["step_a"], items)
    result = enrich("export", str(batch_id), "-o", "-")
    assert result.exit_code == 0, result.stderr
    rows = read_csv(result.stdout)
    assert rows[0] == ["n", "zz", "c_mid", "b_late", "item_id", "step_a: status", "step_a: error"]
    assert [r[0] for r in rows[1:]] == [f"item-{99 - i:02d}" for i in range(60)]
    assert [r[4] for r in rows[1:]] == [str(i) for i in item_ids(db, batch_id)]
    assert rows[6][:4] + rows[6][5:] == ["item-94", "5", "first seen at row 5", "", "pending", ""]
    assert rows[11][:4] + rows[11][5:] == [
        "item-89",
        "10",
        "",
        "first seen at row 10",
        "pending",
        "",
    ]


def test_export_step_without_results_table(db: str) -> None:
    with psycopg.connect(db) as conn:
        conn.execute(
            "insert into enrichment_registry (step_name, modal_function_name, results_table)"
            " values ('notify_only', 'notify_only', null)"
        )
    batch_id = create_batch(db, ["notify_only", "step_a"], [{"name": "Acme"}])
    result = enrich("export", str(batch_id), "-o", "-")
    assert result.exit_code == 0, result.stderr
    (item_id,) = item_ids(db, batch_id)
    assert read_csv(result.stdout) == [
        [
            "name",
            "item_id",
            "notify_only: status",
            "notify_only: error",
            "step_a: status",
            "step_a: error",
        ],
        ["Acme", str(item_id), "pending", "", "not reached", ""],
    ]


def test_export_column_name_collisions(db: str) -> None:
    batch_id = create_batch(db, ["step_a"], [{"step_a.status": "an input column"}])
    result = enrich("export", str(batch_id), "-o", "-", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {
        "step_a.status": "an input column",
        "step_a.status#2": "PENDING",
        "step_a.error": None,
    }


def test_export_replaces_a_file_only_on_success(seeded: Seeded, tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    out.write_text("previous export\n", encoding="utf-8")
    result = enrich("export", MISSING, "-o", str(out))
    assert result.exit_code == 1
    assert f"batch {MISSING} not found" in result.stderr
    assert out.read_text(encoding="utf-8") == "previous export\n"
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]
    result = enrich("export", str(seeded.batch_id), "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert read_csv(out.read_text(encoding="utf-8"))[0] == SHEET_COLUMNS
    assert [p.name for p in tmp_path.iterdir()] == ["out.csv"]


def test_export_refusals(db: str, tmp_path: Path) -> None:
    missing = enrich("export", MISSING, "-o", str(tmp_path / "x.csv"))
    assert missing.exit_code == 1
    assert f"batch {MISSING} not found" in missing.stderr
    assert missing.stdout == ""
    assert not (tmp_path / "x.csv").exists()
    bad_uuid = enrich("export", "not-a-uuid", "-o", str(tmp_path / "x.csv"))
    assert bad_uuid.exit_code == 2
    assert "'not-a-uuid' is not a valid UUID" in bad_uuid.stderr
    no_dir = enrich("export", MISSING, "-o", str(tmp_path / "nope" / "x.csv"))
    assert no_dir.exit_code == 2
    assert "no such directory" in no_dir.stderr
    no_output = enrich("export", MISSING)
    assert no_output.exit_code == 2
    assert "Missing option '-o'" in no_output.stderr
    assert list(tmp_path.iterdir()) == []


# enrich retry / cancel ----------------------------------------------------------------------------


def test_retry_puts_failed_rows_back_to_pending(seeded: Seeded, db: str) -> None:
    result = enrich("retry", str(seeded.batch_id))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "1\n"
    assert "retried 1 failed row(s)" in result.stderr
    assert f"enrich run --batch {seeded.batch_id}" in result.stderr
    assert "enrich serve" in result.stderr
    assert states(db, seeded.batch_id) == [
        (0, "step_a", "COMPLETED", None),
        (0, "step_b", "COMPLETED", None),
        (1, "step_a", "PENDING", None),
        (2, "step_a", "COMPLETED", None),
        (2, "step_b", "IN_PROGRESS", None),
        (3, "step_a", "PENDING", None),
    ]
    again = enrich("retry", str(seeded.batch_id))
    assert again.exit_code == 0
    assert again.stdout == "0\n"
    assert "nothing to retry" in again.stderr


def test_retry_one_step(seeded: Seeded, db: str) -> None:
    result = enrich("retry", str(seeded.batch_id), "--step", "step_b")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "0\n"
    assert "no FAILED rows at step step_b" in result.stderr
    assert (1, "step_a", "FAILED", ERROR) in states(db, seeded.batch_id)
    result = enrich("retry", str(seeded.batch_id), "--step", "step_a")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "1\n"
    assert (1, "step_a", "PENDING", None) in states(db, seeded.batch_id)


def test_cancel_then_resume_with_retry(seeded: Seeded, db: str) -> None:
    result = enrich("cancel", str(seeded.batch_id))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "2\n"
    assert "cancelled 2 unfinished row(s)" in result.stderr
    assert f"enrich retry {seeded.batch_id}" in result.stderr
    assert states(db, seeded.batch_id) == [
        (0, "step_a", "COMPLETED", None),
        (0, "step_b", "COMPLETED", None),
        (1, "step_a", "FAILED", ERROR),
        (2, "step_a", "COMPLETED", None),
        (2, "step_b", "FAILED", "cancelled"),
        (3, "step_a", "FAILED", "cancelled"),
    ]
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "select status::text, cancelled_at is not null from batches where id = %s",
            (seeded.batch_id,),
        ).fetchone()
    assert row == ("FAILED", True)

    exported = enrich("export", str(seeded.batch_id), "-o", "-", "--status", "failed")
    assert exported.exit_code == 0, exported.stderr
    rows = read_csv(exported.stdout)
    assert [(r[1], r[6], r[7], r[11], r[12]) for r in rows[1:]] == [
        ("zurich.ch", "failed", ERROR_LINE, "not reached", ""),
        ("q.io", "completed", "", "failed", "cancelled"),
        ("d.com", "failed", "cancelled", "not reached", ""),
    ]

    again = enrich("cancel", str(seeded.batch_id))
    assert again.exit_code == 0
    assert again.stdout == "0\n"
    assert "nothing to cancel" in again.stderr

    resumed = enrich("retry", str(seeded.batch_id))
    assert resumed.exit_code == 0, resumed.stderr
    assert resumed.stdout == "3\n"
    assert [s[2] for s in states(db, seeded.batch_id)] == [
        "COMPLETED",
        "COMPLETED",
        "PENDING",
        "COMPLETED",
        "PENDING",
        "PENDING",
    ]
    with psycopg.connect(db) as conn:
        row = conn.execute(
            "select status::text, cancelled_at is not null from batches where id = %s",
            (seeded.batch_id,),
        ).fetchone()
    assert row == ("IN_PROGRESS", False)


def test_retry_and_cancel_refusals(seeded: Seeded, db: str) -> None:
    for command in ("retry", "cancel"):
        missing = enrich(command, MISSING)
        assert missing.exit_code == 1, command
        assert f"batch {MISSING} not found" in missing.stderr
        assert missing.stdout == ""
        bad_uuid = enrich(command, "12345")
        assert bad_uuid.exit_code == 2
        assert "'12345' is not a valid UUID" in bad_uuid.stderr
    bad_step = enrich("retry", str(seeded.batch_id), "--step", "enrich_with_magic")
    assert bad_step.exit_code == 2
    assert bad_step.stdout == ""
    assert (
        f'step "enrich_with_magic" is not in the blueprint of batch {seeded.batch_id}'
        " (step_a, step_b)"
    ) in bad_step.stderr
    assert (1, "step_a", "FAILED", ERROR) in states(db, seeded.batch_id)


def test_export_to_a_closed_pipe_exits_quietly(db: str) -> None:
    """`enrich export B -o - | head -1`: no traceback, no error message, exit 1 (incomplete)."""
    batch_id = create_batch(db, ["step_a"], [{"name": f"company {i:05d}"} for i in range(20_000)])
    env = {**os.environ, "DATABASE_URL": db}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli.main", "export", str(batch_id), "-o", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline() == b"name,item_id,step_a: status,step_a: error\n"
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1
    assert stderr == ""


def test_export_keeps_the_csv_column_order(db: str, tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    source.write_text("Zeta,Alpha,Website,Middle\nz1,a1,acme.com,m1\n", encoding="utf-8")
    created = enrich("batch", "create", str(source), "--steps", "step_a")
    assert created.exit_code == 0, created.stderr
    batch_id = created.stdout.strip().splitlines()[-1]

    result = enrich("export", batch_id, "-o", "-")

    assert result.exit_code == 0, result.stderr
    rows = read_csv(result.stdout)
    # The file's own header names, as typed, in its order.
    assert rows[0] == [
        "Zeta",
        "Alpha",
        "Website",
        "Middle",
        "item_id",
        "step_a: status",
        "step_a: error",
    ]
    assert rows[1][:4] + rows[1][5:] == ["z1", "a1", "acme.com", "m1", "pending", ""]
