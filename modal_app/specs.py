"""Deployment settings of each Modal function, mirroring the registry (supabase/seed.sql).

The registry in the database is the source of truth at run time; Modal needs timeouts and retries
when the app is deployed, before any database is read. tests/test_modal_app.py checks that these
match the seeded registry, so the two cannot drift apart silently.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FunctionSpec:
    # Modal's timeout: the registry's config.timeout_seconds (the lease), so Modal stops a call
    # no later than the database would retry it.
    timeout_seconds: int
    # Platform-level retries of the same attempt when a container dies (preemption, OOM). The
    # database's own retries (config.max_attempts) come on top, with a new attempt each.
    modal_retries: int = 1
    max_containers: int | None = None
    # ASYNC in the registry: its provider answers on the callback receiver.
    answered_by_callback: bool = False


FUNCTION_SPECS: dict[str, FunctionSpec] = {
    "step_a": FunctionSpec(timeout_seconds=60),
    "step_b": FunctionSpec(timeout_seconds=60),
    "normalize_domain": FunctionSpec(timeout_seconds=60),
    "clean_company_name": FunctionSpec(timeout_seconds=60),
    "step_async": FunctionSpec(timeout_seconds=30, answered_by_callback=True),
    "clay_enrich": FunctionSpec(timeout_seconds=30, answered_by_callback=True),
    "exa_verify": FunctionSpec(timeout_seconds=30),
}
