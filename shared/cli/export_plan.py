"""What ``enrich export`` reads: the batch's columns, and one query streaming its items.

The plan is read in the export's transaction (REPEATABLE READ), so the columns match the rows
even while workers run. Everything that scans the batch is an aggregate in the database:
memory stays bounded at a million rows.

JSON lines (the machine format) has one column per input key, then per blueprint step
``<step>.status``, ``<step>.error`` and one ``<step>.<key>`` per top-level key of the step's
results (the union over the batch, first-seen order; a key ``status`` or ``error`` becomes
``<step>.result.<key>``). Spreadsheets (``shared.cli.export_sheet``) show each step's declared
outputs instead, so only steps without a declaration need that union.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, NamedTuple
from uuid import UUID

import psycopg
from psycopg import sql

from shared.queries import query
from shared.step_outputs import OUTPUTS, StepOutput

StatusFilter = Literal["all", "completed", "failed"]
# Result keys that would collide with a step's own state columns.
STATE_COLUMNS = ("status", "error")


@dataclass(frozen=True, slots=True)
class StepColumns:
    """One blueprint step's share of the export."""

    name: str
    results_table: str | None
    # The union of its results' keys: always for JSON lines; for a spreadsheet, only when the
    # step declares no outputs. Empty: no results table, or no result written yet.
    result_keys: tuple[str, ...]
    outputs: tuple[StepOutput, ...] | None = None  # declared (shared.step_outputs)

    @property
    def reads_results(self) -> bool:
        """Whether the export joins the results table (it has something to show from it)."""
        return self.results_table is not None and bool(self.result_keys or self.outputs)


@dataclass(frozen=True, slots=True)
class ExportPlan:
    batch_id: UUID
    item_count: int
    input_keys: tuple[str, ...]
    steps: tuple[StepColumns, ...]
    headers: Mapping[str, str]  # input key -> the CSV's own header name, where it had one

    @property
    def columns(self) -> list[str]:
        """The JSON lines keys: input keys, then per step status, error and result keys."""
        names = list(self.input_keys)
        for step in self.steps:
            names += [f"{step.name}.status", f"{step.name}.error"]
            names += [
                f"{step.name}.result.{key}" if key in STATE_COLUMNS else f"{step.name}.{key}"
                for key in step.result_keys
            ]
        return distinct(names)


def distinct(names: Sequence[str]) -> list[str]:
    """Suffix ``#2``, ``#3``... to repeated names (say an input key ``step_a.status``)."""
    used: set[str] = set()
    out: list[str] = []
    for name in names:
        candidate, n = name, 1
        while candidate in used:
            n += 1
            candidate = f"{name}#{n}"
        used.add(candidate)
        out.append(candidate)
    return out


def _result_keys_query(results_table: str) -> sql.Composed:
    """The union of the top-level keys of a results table's ``result``, first-seen order."""
    return sql.SQL(
        "select k.key from {table} r "
        "join public.batch_items bi on bi.batch_id = r.batch_id and bi.id = r.item_id "
        "cross join lateral jsonb_object_keys(case when jsonb_typeof(r.result) = 'object' "
        "then r.result else '{{}}'::jsonb end) as k(key) "
        "where r.batch_id = %(batch_id)s "
        'group by k.key order by min(bi.seq), k.key collate "C"'
    ).format(table=sql.Identifier("public", results_table))


def declared_outputs(function: str | None, config: Any) -> tuple[StepOutput, ...] | None:
    """The step's declared outputs, or None when its function declares none."""
    outputs_of = OUTPUTS.get(function or "")
    if outputs_of is None:
        return None
    return outputs_of(config if isinstance(config, Mapping) else {})


async def build_plan(
    conn: psycopg.AsyncConnection[Any], batch_id: UUID, *, sheet: bool = False
) -> ExportPlan:
    """The columns of an export (``sheet``: for a spreadsheet, with declared outputs). Raises
    psycopg's ``NoDataFound`` (P0002) for an unknown batch."""
    params = {"batch_id": batch_id}
    cur = await conn.execute(query("export_steps"), params)
    step_rows = await cur.fetchall()
    item_count = int(step_rows[0][2]) if step_rows else 0
    cur = await conn.execute(query("export_input_keys"), params)
    input_keys = tuple(str(row[0]) for row in await cur.fetchall())
    steps: list[StepColumns] = []
    for step_name, results_table, _, function, config in step_rows:
        outputs = declared_outputs(function, config) if sheet else None
        keys: tuple[str, ...] = ()
        if results_table is not None and outputs is None:
            cur = await conn.execute(_result_keys_query(results_table), params)
            keys = tuple(str(row[0]) for row in await cur.fetchall())
        steps.append(StepColumns(str(step_name), results_table, keys, outputs))
    headers: dict[str, str] = {}
    if sheet:
        headers, declared = await _headers(conn, params)
        # The import drops empty values: a column empty in every row is in no item, yet it was
        # in the user's file, so a spreadsheet shows it.
        input_keys = (*declared, *(key for key in input_keys if key not in set(declared)))
    return ExportPlan(batch_id, item_count, input_keys, tuple(steps), headers)


async def _headers(
    conn: psycopg.AsyncConnection[Any], params: dict[str, Any]
) -> tuple[dict[str, str], tuple[str, ...]]:
    """Input key -> the header it was imported from (the first, should two share a key), and
    the file's keys in column order; empty for a batch made without an import."""
    cur = await conn.execute(query("export_headers"), params)
    row = await cur.fetchone()
    columns, keys = row if row is not None else (None, None)
    found: dict[str, str] = {}
    if isinstance(columns, dict):
        for header, key in columns.items():
            if isinstance(key, str) and isinstance(header, str) and header.strip():
                found.setdefault(key, header)
    declared = (
        tuple(dict.fromkeys(k for k in keys if isinstance(k, str)))
        if isinstance(keys, list)
        else ()
    )
    return found, declared


# What the query selects per step after its status and error: why a condition skipped it, then
# with ``technical`` (--all-columns) these; the result, when joined, comes last. Timestamps cost
# a parse per row: they are only read when shown.
STEP_FIELDS = ("{s}.meta ->> 'skipped'",)
TECHNICAL_FIELDS = (
    "{s}.attempt",
    "{s}.meta -> 'dispatch' ->> 'call_id'",
    "{s}.started_at",
    "{s}.finished_at",
)


def rows_query(
    plan: ExportPlan, status: StatusFilter, *, technical: bool = False
) -> tuple[sql.Composed, dict[str, Any]]:
    """One row per item in input order: raw_data, the item id, then per step see ``StepRow``."""
    params: dict[str, Any] = {"batch_id": plan.batch_id}
    fields: list[sql.Composable] = [sql.SQL("bi.raw_data"), sql.SQL("bi.id")]
    joins: list[sql.Composable] = []
    state_aliases: list[sql.Identifier] = []
    for i, step in enumerate(plan.steps):
        s = sql.Identifier(f"s{i}")
        state_aliases.append(s)
        params[f"step{i}"] = step.name
        # An ASYNC row waiting for its provider's callback is not "running", and a row a
        # condition skipped did not run: say so.
        fields.append(
            sql.SQL(
                "case when public.awaiting_callback({s}.status, {s}.attempt, {s}.meta)"
                " then 'AWAITING_CALLBACK'"
                " when {s}.status = 'COMPLETED' and {s}.meta ? 'skipped' then 'SKIPPED'"
                " else {s}.status::text end"
            ).format(s=s)
        )
        fields.append(
            sql.SQL("case when {s}.status = 'FAILED' then {s}.meta ->> 'error' end").format(s=s)
        )
        shown = STEP_FIELDS + (TECHNICAL_FIELDS if technical else ())
        fields += [sql.SQL(field).format(s=s) for field in shown]
        joins.append(
            sql.SQL(
                "left join public.workflow_states {s} on {s}.batch_id = bi.batch_id"
                " and {s}.item_id = bi.id and {s}.step_name = {step}"
            ).format(s=s, step=sql.Placeholder(f"step{i}"))
        )
        if step.reads_results:
            assert step.results_table is not None
            r = sql.Identifier(f"r{i}")
            fields.append(sql.SQL("{r}.result").format(r=r))
            joins.append(
                sql.SQL(
                    "left join {table} {r} on {r}.batch_id = bi.batch_id and {r}.item_id = bi.id"
                ).format(table=sql.Identifier("public", step.results_table), r=r)
            )
    where: list[sql.Composable] = [sql.SQL("bi.batch_id = %(batch_id)s")]
    if status == "completed":  # finished the whole blueprint
        where.append(sql.SQL("{s}.status = 'COMPLETED'").format(s=state_aliases[-1]))
    elif status == "failed":  # stopped by a FAILED step
        where.append(
            sql.SQL("'FAILED' in ({})").format(
                sql.SQL(", ").join(sql.SQL("{}.status").format(s) for s in state_aliases)
            )
        )
    statement = sql.SQL("select {fields} from public.batch_items bi {joins} where {where}").format(
        fields=sql.SQL(", ").join(fields),
        joins=sql.SQL(" ").join(joins),
        where=sql.SQL(" and ").join(where),
    ) + sql.SQL(" order by bi.seq")
    return statement, params


class StepRow(NamedTuple):
    """One step's state for one item, as ``rows_query`` selects it (all None: not reached)."""

    status: str | None  # the workflow status, or AWAITING_CALLBACK / SKIPPED
    error: str | None  # a FAILED row's error
    skipped: str | None  # why a condition skipped it
    result: dict[str, Any] | None
    # Selected only for --all-columns (``technical``): None otherwise.
    attempt: int | None = None
    call_id: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


def step_rows(
    plan: ExportPlan, row: Sequence[Any], *, technical: bool = False
) -> Iterator[tuple[StepColumns, StepRow]]:
    """A fetched row's steps, each with its state and result (``technical`` as in the query)."""
    i = 2
    extra = len(TECHNICAL_FIELDS) if technical else 0
    for step in plan.steps:
        status, error, skipped = row[i : i + 3]
        i += 3
        more = row[i : i + extra]
        i += extra
        result: Any = None
        if step.reads_results:
            result = row[i]
            i += 1
        found = result if isinstance(result, dict) else None
        yield step, StepRow(status, error, skipped, found, *more)


def row_values(plan: ExportPlan, row: Sequence[Any]) -> list[Any]:
    """A fetched row as the JSON lines values (JSON values; None where there is nothing)."""
    raw: dict[str, Any] = row[0]
    values: list[Any] = [raw.get(key) for key in plan.input_keys]
    for step, state in step_rows(plan, row):
        values += [state.status, state.error]
        found = state.result or {}
        values.extend(found.get(key) for key in step.result_keys)
    return values


__all__ = [
    "ExportPlan",
    "StatusFilter",
    "StepColumns",
    "StepRow",
    "build_plan",
    "distinct",
    "row_values",
    "rows_query",
    "step_rows",
]
