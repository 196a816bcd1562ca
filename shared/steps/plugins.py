"""Step handlers from other modules: ``ENRICH_STEP_MODULES=my_company.steps,other.steps``.

Each module defines ``HANDLERS: dict[str, StepHandler]`` keyed by the ``modal_function_name`` its
registry rows use. This is how a team adds its own steps to the local pool without editing this
package (on Modal, they add a function to their app the same way).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

from shared.errors import ConfigurationError
from shared.steps import HANDLERS
from shared.steps.base import StepHandler


def load_handlers(modules: str) -> dict[str, StepHandler]:
    """The built-in handlers plus those of each named module (later modules win)."""
    handlers = dict(HANDLERS)
    for name in (m.strip() for m in modules.split(",")):
        if not name:
            continue
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigurationError(f"ENRICH_STEP_MODULES: cannot import {name!r}: {exc}") from exc
        extra = getattr(module, "HANDLERS", None)
        if not isinstance(extra, Mapping) or not all(
            isinstance(k, str) and callable(v) for k, v in extra.items()
        ):
            raise ConfigurationError(
                f"ENRICH_STEP_MODULES: {name} must define HANDLERS, a dict of name -> async handler"
            )
        handlers.update(extra)
    return handlers
