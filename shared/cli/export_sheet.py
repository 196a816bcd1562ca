"""The columns of a spreadsheet export (CSV and Excel), for the people who open it.

One row per item, in input order: the input columns under the file's own header names, in its
order, every one of them, even a column empty in every row (as the import recorded them in
``batches.meta.source``; a batch made by SQL or Studio shows its ``raw_data`` keys), an
``item_id``, then per blueprint step:

- ``<step>: status``: completed, failed, running, queued, pending, awaiting callback (an ASYNC
  row waiting for its provider), skipped (with the condition's reason), or not reached (the item
  has not got to the step: an earlier one failed or is still running);
- ``<step>: error``: a failed row's error, on one line;
- ``<step>: <output>``: the outputs the step declares (``shared.step_outputs``), e.g.
  ``normalize_domain: domain``. A step declaring none shows each top-level key of its results
  (the union over the batch) but ``cached_from`` and ``skipped``, which the status tells.

The columns depend on the blueprint and the declarations only, not on how far the batch got.
``--all-columns`` adds per step the technical columns: attempts, call id, started at, finished
at and the whole result as JSON (with ``cached_from`` for a result the cache gave). A name
used twice (an input header ``item_id``) gets ``#2`` on its second use.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from shared.cli.export_plan import STATE_COLUMNS, ExportPlan, StepColumns, StepRow, distinct
from shared.cli.export_plan import step_rows as _step_rows

ITEM_ID = "item_id"
# Result keys a step without declared outputs does not show: the status already tells.
HIDDEN_RESULT_KEYS = frozenset({"cached_from", "skipped"})
TECHNICAL = ("attempts", "call id", "started at", "finished at", "result (JSON)")
STATUS_TEXT = {
    "PENDING": "pending",
    "QUEUED": "queued",
    "IN_PROGRESS": "running",
    "AWAITING_CALLBACK": "awaiting callback",
    "COMPLETED": "completed",
    "FAILED": "failed",
    "SKIPPED": "skipped",
}
NOT_REACHED = "not reached"


@dataclass(frozen=True, slots=True)
class Sheet:
    """A plan laid out for a spreadsheet: the header row and each row's values."""

    plan: ExportPlan
    headers: list[str]
    keys: tuple[tuple[str, ...], ...]  # per step, the result keys shown
    all_columns: bool

    def values(self, row: Sequence[Any]) -> list[Any]:
        """A fetched row's values (JSON values, text or None; cells render them)."""
        raw: dict[str, Any] = row[0]
        values: list[Any] = [raw.get(key) for key in self.plan.input_keys]
        values.append(str(row[1]))
        states = _step_rows(self.plan, row, technical=self.all_columns)
        for (_, state), keys in zip(states, self.keys, strict=True):
            values += [status_text(state), " ".join(state.error.split()) if state.error else None]
            found = state.result or {}
            values.extend(found.get(key) for key in keys)
            if self.all_columns:
                values += _technical(state)
        return values


def sheet_layout(plan: ExportPlan, *, all_columns: bool) -> Sheet:
    """The spreadsheet columns of ``plan`` (see the module docstring)."""
    names = [plan.headers.get(key, key) for key in plan.input_keys]
    names.append(ITEM_ID)
    keys: list[tuple[str, ...]] = []
    for step in plan.steps:
        shown = _shown(step)
        keys.append(tuple(key for key, _ in shown))
        names += [f"{step.name}: status", f"{step.name}: error"]
        names += [f"{step.name}: {label}" for _, label in shown]
        if all_columns:
            names += [f"{step.name}: {label}" for label in TECHNICAL]
    return Sheet(plan, distinct(names), tuple(keys), all_columns)


def _shown(step: StepColumns) -> list[tuple[str, str]]:
    """(result key, label) of the outputs shown for ``step``."""
    if step.outputs is not None:
        return [(output.key, output.label) for output in step.outputs]
    return [
        (key, f"result {key}" if key in STATE_COLUMNS else key)
        for key in step.result_keys
        if key not in HIDDEN_RESULT_KEYS
    ]


def status_text(state: StepRow) -> str:
    if state.status is None:
        return NOT_REACHED
    text = STATUS_TEXT.get(state.status, state.status.lower())
    if state.status == "SKIPPED" and state.skipped:
        return f"{text} ({state.skipped})"
    return text


def _technical(state: StepRow) -> list[Any]:
    result = None
    if state.result is not None:
        result = json.dumps(state.result, ensure_ascii=False, sort_keys=True)
    return [state.attempt, state.call_id, state.started_at, state.finished_at, result]


__all__ = ["ITEM_ID", "NOT_REACHED", "Sheet", "sheet_layout", "status_text"]
