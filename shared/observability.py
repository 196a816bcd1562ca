"""Optional error reporting with Sentry: on only when ``SENTRY_DSN`` is set, else off (and free).

Called at the start of the conductor flow and of every Modal function call; the first call in a
process initialises the SDK, later ones do nothing. Release and environment come from
``SENTRY_RELEASE`` and ``SENTRY_ENVIRONMENT`` (deploy.sh sets both, with ``ENRICH_ENVIRONMENT`` as a
fallback for the environment).

No personal data: the items are companies and people from CRM exports, so besides Sentry's own
``send_default_pii=False``, stack frames carry no local variables (they could hold ``raw_data`` or a
step's result), request bodies are never attached, and ``before_send`` drops any user and request
data. What does reach Sentry is the exception, its stack and the component / function tags.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from shared.extras import cloud_message, missing_modules

log = logging.getLogger(__name__)

DSN_ENV = "SENTRY_DSN"


def _scrub(event: Any, hint: Any) -> Any:
    """Sentry's ``before_send``: drop user and request data, whatever integration added them."""
    if isinstance(event, dict):
        event.pop("user", None)
        event.pop("request", None)
    return event


def _sample_rate(name: str) -> float:
    raw = os.environ.get(name, "").strip()
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        log.warning("%s=%r is not a number: tracing stays off", name, raw)
        return 0.0
    return min(max(value, 0.0), 1.0)


def init_observability(component: str, **tags: str) -> bool:
    """Initialise Sentry for this process when ``SENTRY_DSN`` is set; return whether it is on.

    ``component`` (``conductor``, ``worker``) and ``tags`` are set as tags on later events. A DSN
    that is not a URL (e.g. an unresolved ``{{ $SENTRY_DSN }}``) is ignored with a warning, never an
    error: reporting must not stop the work.
    """
    dsn = os.environ.get(DSN_ENV, "").strip()
    if not dsn:
        return False
    if not dsn.startswith(("https://", "http://")):
        log.warning("%s is set but is not a URL: error reporting stays off", DSN_ENV)
        return False

    if missing_modules("sentry_sdk"):
        # Reporting never stops the work, so a warning (one line), not an error.
        log.warning("%s; error reporting stays off", cloud_message(DSN_ENV, ["sentry_sdk"]))
        return False
    import sentry_sdk

    if not sentry_sdk.is_initialized():
        environment = (
            os.environ.get("SENTRY_ENVIRONMENT", "").strip()
            or os.environ.get("ENRICH_ENVIRONMENT", "").strip()
            or None
        )
        try:
            sentry_sdk.init(
                dsn=dsn,
                release=os.environ.get("SENTRY_RELEASE", "").strip() or None,
                environment=environment,
                send_default_pii=False,
                include_local_variables=False,
                max_request_body_size="never",
                traces_sample_rate=_sample_rate("SENTRY_TRACES_SAMPLE_RATE"),
                before_send=_scrub,
            )
        except Exception:
            log.warning("Sentry could not be initialised: error reporting stays off", exc_info=True)
            return False
    sentry_sdk.set_tag("component", component)
    for key, value in tags.items():
        sentry_sdk.set_tag(key, value)
    return True
