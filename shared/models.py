"""SQLAlchemy models of the schema (the seed's Phase 1) for reading and analysis.

The migrations in ``supabase/migrations`` define the schema and the State API functions; these
models mirror the tables so analysts and scripts can query with SQLAlchemy. State changes never go
through them: every transition is a guarded SQL function (see ``shared.state_api``).
tests/test_models.py checks the models against a migrated database, so they cannot drift.
"""

from __future__ import annotations

import enum
import uuid
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from shared.extras import cloud_message

# SQLAlchemy comes with the cloud extra (the Prefect server needs it), not the local install.
try:
    from sqlalchemy import (
        BigInteger,
        Boolean,
        Date,
        DateTime,
        ForeignKeyConstraint,
        Integer,
        Numeric,
        Text,
    )
    from sqlalchemy import Enum as SAEnum
    from sqlalchemy.dialects.postgresql import JSONB, UUID
    from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
except ImportError:
    raise ImportError(cloud_message("shared.models", ["sqlalchemy"])) from None


class BatchStatus(str, enum.Enum):
    PENDING = "PENDING"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class WorkflowStatus(str, enum.Enum):
    PENDING = "PENDING"
    QUEUED = "QUEUED"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"


class StepType(str, enum.Enum):
    SYNC = "SYNC"
    ASYNC = "ASYNC"


def _enum(cls: type[enum.Enum], name: str) -> SAEnum:
    return SAEnum(cls, name=name, create_type=False, values_callable=lambda e: [m.value for m in e])


class Base(DeclarativeBase):
    pass


class EnrichmentRegistry(Base):
    __tablename__ = "enrichment_registry"

    step_name: Mapped[str] = mapped_column(Text, primary_key=True)
    type: Mapped[StepType] = mapped_column(_enum(StepType, "step_type"))
    modal_function_name: Mapped[str] = mapped_column(Text)
    results_table: Mapped[str | None] = mapped_column(Text)
    config: Mapped[dict[str, Any]] = mapped_column(JSONB)
    description: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Batch(Base):
    __tablename__ = "batches"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    client_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    name: Mapped[str | None] = mapped_column(Text)
    status: Mapped[BatchStatus] = mapped_column(_enum(BatchStatus, "batch_status"))
    blueprint: Mapped[list[str]] = mapped_column(JSONB)
    item_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    meta: Mapped[dict[str, Any]] = mapped_column(JSONB)
    budget_usd: Mapped[Decimal | None] = mapped_column(Numeric)
    use_cache: Mapped[bool] = mapped_column(Boolean)
    spent_usd: Mapped[Decimal] = mapped_column(Numeric)
    paused_reason: Mapped[str | None] = mapped_column(Text)
    # Orders batches within their own tenant only (claim_steps serves tenants in turn first).
    priority: Mapped[int] = mapped_column(Integer)


class Provider(Base):
    """A paid API with shared rate limits (``claim_steps`` enforces them)."""

    __tablename__ = "providers"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    requests_per_second: Mapped[Decimal] = mapped_column(Numeric)
    burst: Mapped[int] = mapped_column(Integer)
    max_concurrency: Mapped[int | None] = mapped_column(Integer)
    daily_cap: Mapped[int | None] = mapped_column(Integer)
    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric)
    recovery_seconds: Mapped[Decimal] = mapped_column(Numeric)
    description: Mapped[str | None] = mapped_column(Text)
    tokens: Mapped[Decimal | None] = mapped_column(Numeric)
    refilled_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    blocked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    slowdown: Mapped[Decimal] = mapped_column(Numeric)
    slowed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rate_limited: Mapped[int] = mapped_column(BigInteger)
    calls_day: Mapped[date | None] = mapped_column(Date)
    calls_today: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ProviderCost(Base):
    """The cost ledger: one row per (batch, item, step, attempt, provider)."""

    __tablename__ = "provider_costs"
    __table_args__ = (
        ForeignKeyConstraint(["batch_id", "item_id"], ["batch_items.batch_id", "batch_items.id"]),
    )

    batch_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    item_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    step_name: Mapped[str] = mapped_column(Text, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    provider: Mapped[str] = mapped_column(Text, primary_key=True)
    units: Mapped[Decimal] = mapped_column(Numeric)
    usd: Mapped[Decimal] = mapped_column(Numeric)
    cached: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ResultCache(Base):
    """Results of steps with ``config.cache``, per client and normalised inputs: a hit completes a
    row without calling the provider (``settle_without_provider``)."""

    __tablename__ = "result_cache"

    client_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    step_name: Mapped[str] = mapped_column(Text, primary_key=True)
    cache_key: Mapped[str] = mapped_column(Text, primary_key=True)
    key_values: Mapped[dict[str, Any]] = mapped_column(JSONB)
    result: Mapped[dict[str, Any]] = mapped_column(JSONB)
    source_batch_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    source_item_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class BatchItem(Base):
    __tablename__ = "batch_items"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    batch_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    seq: Mapped[int] = mapped_column(BigInteger)
    raw_data: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class WorkflowState(Base):
    __tablename__ = "workflow_states"
    __table_args__ = (
        ForeignKeyConstraint(["batch_id", "item_id"], ["batch_items.batch_id", "batch_items.id"]),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    batch_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    item_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    step_name: Mapped[str] = mapped_column(Text)
    step_index: Mapped[int] = mapped_column(Integer)
    status: Mapped[WorkflowStatus] = mapped_column(_enum(WorkflowStatus, "workflow_status"))
    attempt: Mapped[int] = mapped_column(Integer)
    retry_from: Mapped[int] = mapped_column(Integer)
    run_after: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_owner: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    meta: Mapped[dict[str, Any]] = mapped_column(JSONB)


class _StepResult:
    """Columns every results table has; the typed columns are derived from ``result``."""

    batch_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    item_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    result: Mapped[dict[str, Any]] = mapped_column(JSONB)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class StepAResult(_StepResult, Base):
    __tablename__ = "step_a_results"
    slept_ms: Mapped[int | None] = mapped_column(Integer)


class StepBResult(_StepResult, Base):
    __tablename__ = "step_b_results"
    slept_ms: Mapped[int | None] = mapped_column(Integer)


class StepAsyncResult(_StepResult, Base):
    __tablename__ = "step_async_results"
    request_id: Mapped[str | None] = mapped_column(Text)


class NormalizeDomainResult(_StepResult, Base):
    __tablename__ = "normalize_domain_results"
    domain: Mapped[str | None] = mapped_column(Text)
    domain_unicode: Mapped[str | None] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(Text)
    source_field: Mapped[str | None] = mapped_column(Text)


class CleanCompanyNameResult(_StepResult, Base):
    __tablename__ = "clean_company_name_results"
    name: Mapped[str | None] = mapped_column(Text)
    original_name: Mapped[str | None] = mapped_column(Text)
    source_field: Mapped[str | None] = mapped_column(Text)


class ClayEnrichResult(_StepResult, Base):
    __tablename__ = "clay_enrich_results"
    request_id: Mapped[str | None] = mapped_column(Text)
    company_name: Mapped[str | None] = mapped_column(Text)
    domain: Mapped[str | None] = mapped_column(Text)
    linkedin_url: Mapped[str | None] = mapped_column(Text)
    website: Mapped[str | None] = mapped_column(Text)
    employee_count: Mapped[int | None] = mapped_column(Integer)
    employee_range: Mapped[str | None] = mapped_column(Text)
    industry: Mapped[str | None] = mapped_column(Text)
    country: Mapped[str | None] = mapped_column(Text)
    location: Mapped[str | None] = mapped_column(Text)
    description: Mapped[str | None] = mapped_column(Text)
    founded_year: Mapped[int | None] = mapped_column(Integer)


class ExaVerifyResult(_StepResult, Base):
    __tablename__ = "exa_verify_results"
    verified: Mapped[bool | None] = mapped_column(Boolean)
    confidence: Mapped[Decimal | None] = mapped_column(Numeric)
    domain: Mapped[str | None] = mapped_column(Text)
    company_name: Mapped[str | None] = mapped_column(Text)
    matched_url: Mapped[str | None] = mapped_column(Text)
    title: Mapped[str | None] = mapped_column(Text)
    snippet: Mapped[str | None] = mapped_column(Text)
    top_domain: Mapped[str | None] = mapped_column(Text)
    request_id: Mapped[str | None] = mapped_column(Text)
    cost_usd: Mapped[Decimal | None] = mapped_column(Numeric)
