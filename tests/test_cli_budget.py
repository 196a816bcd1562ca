"""Budgets and spend from the command line (issue 8): ``--budget-usd`` and ``--no-cache`` on
``enrich run`` and ``enrich batch create``, ``enrich batch budget``, and the cost ``enrich status``
shows. ``enrich run`` runs in-process (click's CliRunner), its paid step answered by respx."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID

import httpx
import psycopg
import pytest
import respx
from click.testing import CliRunner, Result
from psycopg.types.json import Jsonb
from rich.console import Console

from shared.cli.main import main
from shared.cli.progress import RateMeter, plain_line, projection_text, render, usd_text
from shared.settings import get_settings
from shared.state_api import BatchProgress, CostSummary

URL = "https://paid.test/v1/lookup"
STEP = "paid_lookup"


@pytest.fixture
def db(dsn: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The CLI on this test's database, with the paid test step registered and loadable."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "insert into providers (name, requests_per_second, burst)"
            " values ('paidapi', 1000, 1000)"
        )
        conn.execute(
            "insert into enrichment_registry (step_name, modal_function_name, config)"
            " values (%s, 'paid_call', %s)",
            (STEP, Jsonb({"provider": "paidapi", "url": URL, "cost_usd": 0.01})),
        )
    monkeypatch.setenv("DATABASE_URL", dsn)
    monkeypatch.setenv("ENRICH_STEP_MODULES", "tests.plugins.paid")
    get_settings.cache_clear()
    yield dsn
    get_settings.cache_clear()


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    path = tmp_path / "companies.csv"
    rows = "".join(f"Company {i},company{i}.example\n" for i in range(8))
    path.write_text("Company Name,Website\n" + rows, encoding="utf-8")
    return path


@pytest.fixture
def provider() -> Iterator[respx.Route]:
    with respx.mock(assert_all_mocked=True, assert_all_called=False) as router:
        yield router.post(URL).mock(return_value=httpx.Response(200, json={"ok": True}))


def enrich(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def batch_columns(dsn: str, batch_id: UUID) -> tuple[object, ...]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "select budget_usd, use_cache, spent_usd, paused_reason from batches where id = %s",
            (batch_id,),
        ).fetchone()
    assert row is not None
    return tuple(row)


def test_batch_create_takes_a_budget_and_no_cache(db: str, csv_file: Path) -> None:
    result = enrich(
        "batch", "create", str(csv_file), "--steps", STEP, "--budget-usd", "2.5", "--no-cache"
    )
    assert result.exit_code == 0, result.stderr
    batch_id = UUID(result.stdout.strip())
    budget, use_cache, spent, paused = batch_columns(db, batch_id)
    assert (float(str(budget)), use_cache, spent, paused) == (2.5, False, 0, None)

    plain = enrich("batch", "create", str(csv_file), "--steps", STEP)
    assert batch_columns(db, UUID(plain.stdout.strip()))[:2] == (None, True)

    refused = enrich("batch", "create", str(csv_file), "--steps", STEP, "--budget-usd", "-1")
    assert refused.exit_code == 2 and "--budget-usd" in refused.stderr


def test_run_pauses_at_its_budget_and_resumes_with_a_higher_one(
    db: str, csv_file: Path, provider: respx.Route
) -> None:
    result = enrich("run", str(csv_file), "--steps", STEP, "--budget-usd", "0.03")

    assert result.exit_code == 4, result.output
    batch_id = UUID(result.stdout.strip())
    assert provider.call_count == 3  # three calls' worth at $0.01
    assert "paused: budget reached: $0.03 of $0.03" in result.stderr
    assert f"enrich batch budget {batch_id} --usd N" in result.stderr
    assert "cost $0.03 spent of $0.03 budget, ~$0.05 more for the 5 paid rows left" in (
        result.stderr
    )

    status = enrich("status", str(batch_id), "--json")
    cost = json.loads(status.stdout)["cost"]
    assert cost == {
        "spent_usd": 0.03,
        "budget_usd": 0.03,
        "projected_rest_usd": 0.05,
        "paid_rows_done": 3,
        "paid_rows_left": 5,
        "paused_reason": "budget reached: $0.03 of $0.03",
    }
    table = enrich("status", str(batch_id))
    assert "paused: budget reached: $0.03 of $0.03" in table.stdout

    resumed = enrich("run", "--batch", str(batch_id), "--budget-usd", "1")
    assert resumed.exit_code == 0, resumed.output
    assert provider.call_count == 8
    assert batch_columns(db, batch_id)[3] is None
    done = json.loads(enrich("status", str(batch_id), "--json").stdout)
    assert done["status"] == "COMPLETED"
    assert done["cost"]["spent_usd"] == pytest.approx(0.08)
    assert done["cost"]["paid_rows_left"] == 0 and done["cost"]["paused_reason"] is None


def test_batch_budget_sets_and_removes_a_budget(db: str, csv_file: Path) -> None:
    created = enrich("batch", "create", str(csv_file), "--steps", STEP, "--budget-usd", "0")
    batch_id = created.stdout.strip()

    raised = enrich("batch", "budget", batch_id, "--usd", "12.5")
    assert raised.exit_code == 0, raised.stderr
    assert json.loads(raised.stdout) == {
        "batch_id": batch_id,
        "budget_usd": 12.5,
        "spent_usd": 0,
        "paused_reason": None,
    }
    assert "budget $12.50, $0.00 spent" in raised.stderr

    removed = enrich("batch", "budget", batch_id, "--none")
    assert json.loads(removed.stdout)["budget_usd"] is None
    assert "no budget" in removed.stderr

    assert enrich("batch", "budget", batch_id).exit_code == 2
    assert enrich("batch", "budget", batch_id, "--usd", "1", "--none").exit_code == 2
    unknown = enrich("batch", "budget", str(UUID(int=5)), "--usd", "1")
    assert unknown.exit_code == 1 and "not found" in unknown.stderr


def test_a_batch_without_paid_steps_shows_no_cost_line(db: str, csv_file: Path) -> None:
    created = enrich("batch", "create", str(csv_file), "--steps", "normalize_domain")
    status = enrich("status", created.stdout.strip())
    assert status.exit_code == 0 and "cost" not in status.stdout
    cost = json.loads(enrich("status", created.stdout.strip(), "--json").stdout)["cost"]
    assert cost["spent_usd"] == 0 and cost["budget_usd"] is None


@pytest.mark.parametrize(
    ("amount", "text"),
    [(0, "$0.00"), (5, "$5.00"), (0.007, "$0.007"), (1234.5, "$1,234.50"), (0.12345, "$0.1235")],
)
def test_usd_text(amount: float, text: str) -> None:
    assert usd_text(amount) == text


@pytest.mark.parametrize(
    ("amount", "text"),
    [(1.0074, "$1.01"), (0.007, "$0.007"), (1234.567, "$1,234.57"), (0, "$0.00")],
)
def test_a_projection_is_shown_in_cents(amount: float, text: str) -> None:
    assert projection_text(amount) == text


def test_the_live_display_shows_spend_budget_and_pause() -> None:
    progress = BatchProgress(
        batch_id=UUID(int=1),
        name=None,
        status="IN_PROGRESS",
        items=10,
        cancelled=False,
        steps={STEP: {"PENDING": 6, "QUEUED": 0, "IN_PROGRESS": 0, "COMPLETED": 4, "FAILED": 0}},
        cost=CostSummary(
            spent_usd=0.04,
            budget_usd=0.04,
            paused_reason="budget reached: $0.04 of $0.04",
            paid_steps=(STEP,),
            paid_rows_done=4,
            paid_rows_left=6,
            projected_rest_usd=0.06,
        ),
    )
    console = Console(width=200, record=True)
    console.print(render(progress, RateMeter(), 3.0))
    shown = console.export_text()
    assert "cost $0.04 spent of $0.04 budget, ~$0.06 more for the 6 paid rows left" in shown
    assert "paused: budget reached: $0.04 of $0.04" in shown
    line = plain_line(progress, RateMeter(), 3.0)
    assert line.endswith(
        "| cost $0.04 spent of $0.04 budget, ~$0.06 more for the 6 paid rows left  "
        "paused: budget reached: $0.04 of $0.04"
    )
