"""What each built-in step's result holds that a spreadsheet user wants to see, declared.

The CSV and Excel exports show, per blueprint step, its status, its error and these outputs under
readable names ("normalize_domain: domain"). Declared, not discovered: the columns are the same
whether the batch has just started or finished, and tracing fields (request ids, the provider's
raw body, ``cached_from``) stay out of the way; ``enrich export --all-columns`` adds the whole
result as JSON. ``shared.step_inputs`` declares what the steps read; this mirrors it: a
declaration is a function of the step's registry config, keyed like ``shared.steps.HANDLERS`` by
``modal_function_name``. A step without one (the shells, a team's own step) is exported with
every top-level key its results hold (see ``shared.cli.export_sheet``).

The keys must be keys the handlers really return: ``tests/test_export_sheet.py`` runs each
declared step's result builder and checks them, so a renamed result key fails a test rather than
leaving an empty column. Like ``step_inputs`` this module imports nothing of ``shared.steps``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class StepOutput:
    """A top-level ``key`` of the step's result, shown as ``"<step>: <label>"``."""

    key: str
    label: str


OutputsOf = Callable[[Mapping[str, Any]], tuple[StepOutput, ...]]


def _outputs(*pairs: tuple[str, str]) -> tuple[StepOutput, ...]:
    return tuple(StepOutput(key, label) for key, label in pairs)


def normalize_domain_outputs(config: Mapping[str, Any]) -> tuple[StepOutput, ...]:
    """The registrable domain; with ``allow_missing`` a row without one completes, and says why."""
    outputs = _outputs(("domain", "domain"))
    if config.get("allow_missing") is True:
        outputs += _outputs(("missing", "why no domain"))
    return outputs


def clean_company_name_outputs(config: Mapping[str, Any]) -> tuple[StepOutput, ...]:
    """The cleaned name, and what was taken off it (a list, shown joined)."""
    return _outputs(("name", "name"), ("removed", "removed"))


def exa_verify_outputs(config: Mapping[str, Any]) -> tuple[StepOutput, ...]:
    """The verdict and its evidence; the query, costs and the result list stay technical."""
    return _outputs(
        ("verified", "verified"),
        ("confidence", "confidence"),
        ("matched_url", "matched URL"),
        ("snippet", "evidence"),
    )


# The fields parse_clay_callback reads from Clay's answer (its COMMON_FIELDS), in that order.
CLAY_FIELDS = _outputs(
    ("company_name", "company name"),
    ("domain", "domain"),
    ("linkedin_url", "LinkedIn URL"),
    ("website", "website"),
    ("employee_count", "employee count"),
    ("employee_range", "employee range"),
    ("industry", "industry"),
    ("country", "country"),
    ("location", "location"),
    ("description", "description"),
    ("founded_year", "founded year"),
)


def clay_enrich_outputs(config: Mapping[str, Any]) -> tuple[StepOutput, ...]:
    """Every company field of Clay's answer; its request id and raw body stay technical."""
    return CLAY_FIELDS


OUTPUTS: dict[str, OutputsOf] = {
    "normalize_domain": normalize_domain_outputs,
    "clean_company_name": clean_company_name_outputs,
    "exa_verify": exa_verify_outputs,
    "clay_enrich": clay_enrich_outputs,
}

__all__ = ["CLAY_FIELDS", "OUTPUTS", "OutputsOf", "StepOutput"]
