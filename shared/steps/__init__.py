"""Step handlers, keyed by the registry's ``modal_function_name``.

The same handlers run in the local worker pool and in the Modal functions; see ``base`` for the
handler contract. Two more tables describe what some steps need besides a handler:

- ``CALLBACK_PARSERS``, keyed by the registry's ``step_name`` (the name a callback token carries,
  which is all the receiver knows): how an ASYNC step's provider answer becomes its verdict.
  Steps without one get the receiver's ``default_parser``. A second registry row running the same
  function under another step name needs its own entry.
- ``PREFLIGHTS``, keyed by ``modal_function_name`` like ``HANDLERS`` (they check what the handler
  will need): called with the step's registry config before a batch is imported, they raise
  ``ConfigurationError`` for a missing setting, so it is one error and not a failed row per item.
- ``INPUTS`` (defined in ``shared.step_inputs``, which the importer loads without the handlers),
  keyed by ``modal_function_name`` too: called with the step's registry config, they say which
  item fields (or earlier steps' results) the handler reads, so an import refuses a file no column
  of which feeds a step. Steps without an entry (the shells) read nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from shared.providers.clay import check_clay_config
from shared.providers.exa import check_exa_config
from shared.state_api import StepFailure, StepResult, TaskRef
from shared.step_inputs import INPUTS, InputsOf, StepInputs
from shared.steps.async_shell import step_async
from shared.steps.base import StepContext, StepHandler, Submitted
from shared.steps.clay_enrich import clay_enrich, parse_clay_callback
from shared.steps.domains import normalize_domain
from shared.steps.exa_verify import exa_verify
from shared.steps.names import clean_company_name
from shared.steps.shells import noop, step_a, step_b

# The receiver's ``Parser`` (shared.callbacks.receiver), spelled out here: importing the receiver
# would load starlette and uvicorn into every worker that imports a step.
CallbackParser = Callable[[TaskRef, Mapping[str, Any]], StepResult | StepFailure]
Preflight = Callable[[Mapping[str, Any]], None]

HANDLERS: dict[str, StepHandler] = {
    "step_a": step_a,
    "step_b": step_b,
    "normalize_domain": normalize_domain,
    "clean_company_name": clean_company_name,
    "noop": noop,
    "step_async": step_async,
    "clay_enrich": clay_enrich,
    "exa_verify": exa_verify,
}

CALLBACK_PARSERS: dict[str, CallbackParser] = {
    "clay_enrich": parse_clay_callback,
}

PREFLIGHTS: dict[str, Preflight] = {
    "clay_enrich": check_clay_config,
    "exa_verify": check_exa_config,
}

__all__ = [
    "CALLBACK_PARSERS",
    "HANDLERS",
    "INPUTS",
    "PREFLIGHTS",
    "CallbackParser",
    "InputsOf",
    "Preflight",
    "StepContext",
    "StepHandler",
    "StepInputs",
    "Submitted",
]
