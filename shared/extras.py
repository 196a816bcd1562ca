"""The ``cloud`` extra: what needs it, and the one line that says so when it is missing.

The local job (``enrich run``, ``serve``, ``batch``, ``db``, ``status``, ``export``) installs
without the cloud SDKs; ``enrich dev up`` (Prefect), the Supabase State API (supabase-py), Sentry,
the SQLAlchemy models and the Modal app need ``pip install 'enrich-orchestrator[cloud]'``. They
check here, before doing anything, so a missing package is one sentence naming what needed it,
never an ImportError traceback.
"""

from __future__ import annotations

import importlib.util

from shared.errors import ConfigurationError

INSTALL_CLOUD = "pip install 'enrich-orchestrator[cloud]'"


class MissingExtra(ConfigurationError):
    """A command or setting needs a package of the ``cloud`` extra that is not installed."""


def missing_modules(*modules: str) -> list[str]:
    """The ``modules`` that cannot be imported here, found without importing them (Prefect alone
    takes seconds to import). A namespace package does not count: run from the repo's root, its
    ``supabase/`` folder of SQL would pass for supabase-py."""
    missing = []
    for name in modules:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a finder refused it; a half-imported module
            spec = None
        found = spec is not None and spec.origin is not None
        if not found:
            missing.append(name)
    return missing


def cloud_message(what: str, missing: list[str]) -> str:
    names = ", ".join(missing)
    verb = "is" if len(missing) == 1 else "are"
    return f"{what} needs the cloud extra ({names} {verb} not installed): {INSTALL_CLOUD}"


def require_cloud(what: str, *modules: str) -> None:
    """Raise :class:`MissingExtra` naming ``what`` when any of ``modules`` is not installed."""
    missing = missing_modules(*modules)
    if missing:
        raise MissingExtra(cloud_message(what, missing))
