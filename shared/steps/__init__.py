"""Step handlers, keyed by the registry's ``modal_function_name``.

The same handlers run in the local worker pool and in the Modal functions; see ``base`` for the
handler contract.
"""

from __future__ import annotations

from shared.steps.async_shell import step_async
from shared.steps.base import StepContext, StepHandler, Submitted
from shared.steps.domains import normalize_domain
from shared.steps.names import clean_company_name
from shared.steps.shells import noop, step_a, step_b

HANDLERS: dict[str, StepHandler] = {
    "step_a": step_a,
    "step_b": step_b,
    "normalize_domain": normalize_domain,
    "clean_company_name": clean_company_name,
    "noop": noop,
    "step_async": step_async,
}

__all__ = ["HANDLERS", "StepContext", "StepHandler", "Submitted"]
