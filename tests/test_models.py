"""The SQLAlchemy models mirror the migrated schema exactly (names, nullability), and query it."""

from __future__ import annotations

import psycopg
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from shared.models import Base, Batch, NormalizeDomainResult, WorkflowState, WorkflowStatus
from shared.pg_state import PgStateAPI
from shared.state_api import StepResult


def _columns(dsn: str, table: str) -> dict[str, bool]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "select column_name, is_nullable = 'YES' from information_schema.columns"
            " where table_schema = 'public' and table_name = %s",
            (table,),
        ).fetchall()
    return {name: nullable for name, nullable in rows}


@pytest.mark.parametrize("table", sorted(Base.metadata.tables))
def test_model_columns_match_the_migrated_table(dsn: str, table: str) -> None:
    in_db = _columns(dsn, table)
    model = Base.metadata.tables[table]

    assert set(in_db) == {c.name for c in model.columns}
    for column in model.columns:
        if not column.primary_key:
            assert column.nullable == in_db[column.name], column.name


def test_every_state_machine_table_has_a_model(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        results_tables = {
            r[0]
            for r in conn.execute(
                "select results_table from enrichment_registry where results_table is not null"
            ).fetchall()
        }
    core = {"batches", "batch_items", "workflow_states", "enrichment_registry"}
    core |= {"providers", "provider_costs", "result_cache"}
    assert set(Base.metadata.tables) == core | results_tables


async def test_models_read_what_the_state_api_wrote(dsn: str) -> None:
    async with await PgStateAPI.open(dsn) as api:
        batch_id = await api.create_batch(["normalize_domain"], [{"website": "https://acme.io/x"}])
        [claimed] = await api.claim(1)
        await api.start([claimed.task])
        await api.complete([StepResult(claimed.task, {"domain": "acme.io"})])

    # The DSN may name a unix socket directory, which SQLAlchemy's URL parser does not take.
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    try:
        with Session(engine) as session:
            batch = session.get(Batch, batch_id)
            assert batch is not None and batch.blueprint == ["normalize_domain"]
            state = session.scalars(
                select(WorkflowState).where(WorkflowState.batch_id == batch_id)
            ).one()
            assert state.status is WorkflowStatus.COMPLETED and state.attempt == 1
            result = session.scalars(select(NormalizeDomainResult)).one()
            assert result.domain == "acme.io"
    finally:
        engine.dispose()
