"""End to end on the local topology: a realistic CSV through normalize_domain and
clean_company_name, with ``LocalRunner`` in-process and with ``enrich run`` as a subprocess.

The batch is ``examples/companies.csv`` (300 rows as exported by a CRM: legal suffixes, odd
casing, URLs with paths and tracking parameters, email-only rows) plus 200 generated rows whose
expected results follow from how they were built.
"""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest

from shared.importer import import_csv
from shared.local import LocalRunner
from shared.pg_state import PgStateAPI

from .contract import TWO_STEPS, Conn, fetch, fetch_one

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_CSV = REPO / "examples" / "companies.csv"
ENRICH = Path(sys.executable).parent / "enrich"
HEADER = [
    "Company Name",
    "Website",
    "LinkedIn URL",
    "Country",
    "City",
    "Employees",
    "Industry",
    "Contact Email",
]
GENERATED = 200
RUN_DEADLINE = 60.0

# Rows of examples/companies.csv (0-based, header excluded): (domain, name) expected exactly.
EXAMPLE_EXPECTED: dict[int, tuple[str, str]] = {
    0: ("beaconfoods.com.br", "Beacon Foods"),  # "Beacon Foods, Ltda.", bare domain
    1: ("oaknetworks.in", "Oak Networks"),  # "..., Private Limited", http://.../
    2: ("dunenetworks.fr", "Dune Networks"),  # path and ?utm_source
    3: ("junipersecurity.com.br", "Juniper Security"),  # ALL CAPS "S.A."
    6: ("basaltfreight.com.au", "Basalt Freight"),  # no website: from the contact email
    7: ("glacierstudio.ai", "Glacier Studio"),  # HTTPS://GLACIERSTUDIO.AI/about
    11: ("indigoretail.nl", "Indigo Retail"),  # padded with spaces, "N.V."
    13: ("zephyrfoods.ca", "Zephyr Foods"),  # "zephyr foods, ltd."
    32: ("nimbusmetrics.fr", "Nimbus Metrics"),  # lower case, email only
    36: ("northsystems.co.uk", "North Systems"),  # "..., Limited", upper-case URL
    39: ("thistlelearning.com.br", "Thistle Learning"),  # deep path with tracking
}

ADJECTIVES = [
    "Amber",
    "Birch",
    "Cedar",
    "Delta",
    "Ember",
    "Fable",
    "Garnet",
    "Harbor",
    "Indigo",
    "Jasper",
    "Kestrel",
    "Lunar",
    "Maple",
    "Nimbus",
    "Orchid",
    "Prairie",
    "Quartz",
    "Raven",
    "Sable",
    "Tundra",
]
NOUNS = [
    "Analytics",
    "Robotics",
    "Foods",
    "Logistics",
    "Media",
    "Health",
    "Payments",
    "Energy",
    "Studio",
    "Ventures",
]


def generated_row(i: int) -> tuple[dict[str, str], str, str]:
    """A CSV row in one of four export styles, with its expected domain and clean name."""
    adj, noun = ADJECTIVES[i % len(ADJECTIVES)], NOUNS[i // len(ADJECTIVES)]
    a, n = adj.lower(), noun.lower()
    name = f"{adj} {noun}"
    style = i % 4
    if style == 0:
        row = {
            "Company Name": f"{adj} {noun}, Inc.",
            "Website": f"https://www.{a}{n}.com/about?x=1",
        }
        return row, f"{a}{n}.com", name
    if style == 1:
        row = {
            "Company Name": f"{name.upper()} GMBH",
            "Website": f"HTTP://{a.upper()}{n.upper()}.CO.UK/",
        }
        return row, f"{a}{n}.co.uk", name
    if style == 2:
        row = {"Company Name": f"{a} {n} ltd", "Contact Email": f"sales@{a}-{n}.de"}
        return row, f"{a}-{n}.de", name
    row = {
        "Company Name": f"{name} Pty Ltd",
        "Website": f"{a}{n}.com.au",
        "LinkedIn URL": f"https://www.linkedin.com/company/{a}{n}",
    }
    return row, f"{a}{n}.com.au", name


def expected_results() -> dict[int, tuple[str, str]]:
    """Expected (domain, name) by 0-based row position in the combined CSV."""
    with EXAMPLE_CSV.open(encoding="utf-8", newline="") as fh:
        example_rows = sum(1 for _ in csv.reader(fh)) - 1
    expected = dict(EXAMPLE_EXPECTED)
    for i in range(GENERATED):
        _, domain, name = generated_row(i)
        expected[example_rows + i] = (domain, name)
    return expected


def write_csv(path: Path, extra_rows: list[dict[str, str]]) -> Path:
    """examples/companies.csv followed by ``extra_rows``."""
    text = EXAMPLE_CSV.read_text(encoding="utf-8").rstrip("\n") + "\n"
    path.write_text(text, encoding="utf-8")
    with path.open("a", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADER)
        writer.writerows(extra_rows)
    return path


@pytest.fixture
def companies_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "companies.csv", [generated_row(i)[0] for i in range(GENERATED)])


def results_by_position(dsn: str, batch_id: UUID) -> tuple[int, list[dict[str, Any]]]:
    """(item count, one dict per item in CSV order with its result rows of both steps)."""
    with psycopg.connect(dsn) as conn:
        item_count = conn.execute(
            "select count(*) from batch_items where batch_id = %s", (batch_id,)
        ).fetchone()
        rows = conn.execute(
            """
            select bi.seq,
                   (select count(*) from normalize_domain_results r
                     where r.batch_id = bi.batch_id and r.item_id = bi.id) as n_domain,
                   (select count(*) from clean_company_name_results r
                     where r.batch_id = bi.batch_id and r.item_id = bi.id) as n_name,
                   d.domain, c.name
            from batch_items bi
            left join normalize_domain_results d on d.batch_id = bi.batch_id and d.item_id = bi.id
            left join clean_company_name_results c on c.batch_id = bi.batch_id and c.item_id = bi.id
            where bi.batch_id = %s
            order by bi.seq
            """,
            (batch_id,),
        ).fetchall()
    assert item_count is not None
    return int(item_count[0]), [
        {"n_domain": r[1], "n_name": r[2], "domain": r[3], "name": r[4]} for r in rows
    ]


def assert_results(dsn: str, batch_id: UUID, items: int) -> None:
    count, rows = results_by_position(dsn, batch_id)
    assert count == items == len(rows)
    # Exactly one result row per item per step, and nothing beyond the batch's items.
    assert {(r["n_domain"], r["n_name"]) for r in rows} == {(1, 1)}
    with psycopg.connect(dsn) as conn:
        totals = conn.execute(
            "select (select count(*) from normalize_domain_results where batch_id = %(b)s),"
            " (select count(*) from clean_company_name_results where batch_id = %(b)s)",
            {"b": batch_id},
        ).fetchone()
    assert totals == (items, items)
    expected = expected_results()
    got = {i: (rows[i]["domain"], rows[i]["name"]) for i in expected}
    assert got == expected


async def test_local_runner_enriches_a_realistic_batch(
    companies_csv: Path, dsn: str, conn: Conn
) -> None:
    report = await import_csv(dsn, companies_csv, ",".join(TWO_STEPS), name="e2e")
    items = report.rows_imported
    assert items == 300 + GENERATED
    batch_id = report.batch_id

    async with await PgStateAPI.open(dsn, max_size=8) as api:
        runner = LocalRunner(dsn, api, batch_ids=[batch_id], sweep_interval=1.0)

        async def finished() -> bool:
            return (await api.batch_progress(batch_id)).finished

        stats = await asyncio.wait_for(runner.run(until=finished), RUN_DEADLINE)
        progress = await api.batch_progress(batch_id)

    assert progress.status == "COMPLETED"
    assert progress.items_completed == items and progress.items_failed == 0
    assert stats.claimed == 2 * items  # every row claimed once: no retries, no duplicates
    assert runner.dispatcher.stats.completed == 2 * items
    attempts = await fetch(
        conn,
        "select step_name, status::text as status, attempt, count(*) as n from workflow_states"
        " where batch_id = %s group by 1, 2, 3 order by 1",
        (batch_id,),
    )
    assert {(r["step_name"], r["status"], r["attempt"], r["n"]) for r in attempts} == {
        ("clean_company_name", "COMPLETED", 1, items),
        ("normalize_domain", "COMPLETED", 1, items),
    }
    assert_results(dsn, batch_id, items)
    batch = await fetch_one(
        conn, "select finished_at is not null as finished from batches where id = %s", (batch_id,)
    )
    assert batch["finished"]


def enrich_run(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": dsn}
    env.pop("ENRICH_STEP_MODULES", None)
    return subprocess.run(
        [str(ENRICH), "run", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def batch_id_from(result: subprocess.CompletedProcess[str]) -> UUID:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout  # the batch id alone: scripts capture it
    return UUID(lines[0])


def test_enrich_run_completes_the_batch_and_prints_its_id(companies_csv: Path, dsn: str) -> None:
    result = enrich_run(dsn, str(companies_csv), "--steps", ",".join(TWO_STEPS))

    assert result.returncode == 0, result.stderr
    batch_id = batch_id_from(result)
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "select status::text, name, item_count from batches where id = %s", (batch_id,)
        ).fetchone()
        n_batches = conn.execute("select count(*) from batches").fetchone()
    assert row == ("COMPLETED", "companies.csv", 300 + GENERATED)
    assert n_batches == (1,)
    assert_results(dsn, batch_id, 300 + GENERATED)


def test_enrich_run_exits_3_when_items_fail_terminally(tmp_path: Path, dsn: str) -> None:
    bad = [
        {"Company Name": "Ghost Co", "Website": "https://www.linkedin.com/company/ghost"},
        {"Company Name": "Ip Co", "Website": "http://192.168.1.10/"},
        {"Company Name": "Free Co", "Contact Email": "founder@gmail.com"},
    ]
    path = tmp_path / "mixed.csv"
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows([generated_row(i)[0] for i in range(17)] + bad)

    result = enrich_run(dsn, str(path), "--steps", ",".join(TWO_STEPS))

    assert result.returncode == 3, (result.returncode, result.stderr)
    batch_id = batch_id_from(result)
    assert "3 item(s) failed" in result.stderr
    with psycopg.connect(dsn) as conn:
        status = conn.execute("select status::text from batches where id = %s", (batch_id,))
        assert status.fetchone() == ("FAILED",)
        failed = conn.execute(
            """
            select bi.raw_data ->> 'name', ws.step_name, ws.attempt, ws.meta ->> 'error'
            from workflow_states ws join batch_items bi on bi.id = ws.item_id
            where ws.batch_id = %s and ws.status = 'FAILED' order by bi.seq
            """,
            (batch_id,),
        ).fetchall()
        completed = conn.execute(
            "select count(*) from workflow_states"
            " where batch_id = %s and step_name = 'clean_company_name' and status = 'COMPLETED'",
            (batch_id,),
        ).fetchone()
        active = conn.execute(
            "select count(*) from workflow_states where batch_id = %s"
            " and status in ('PENDING', 'QUEUED', 'IN_PROGRESS')",
            (batch_id,),
        ).fetchone()
    # Terminal: failed at the first attempt, never retried; the error says why.
    assert [(r[0], r[1], r[2]) for r in failed] == [
        ("Ghost Co", "normalize_domain", 1),
        ("Ip Co", "normalize_domain", 1),
        ("Free Co", "normalize_domain", 1),
    ]
    assert "linkedin.com page" in failed[0][3]
    assert "IP address" in failed[1][3]
    assert "free-mail" in failed[2][3]
    assert completed == (17,)
    assert active == (0,)
