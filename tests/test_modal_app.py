"""The Modal app (``modal_app/app.py``) against the seeded registry: it imports without Modal
credentials, defines one function per registry step, and its timeouts match the registry's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import modal
import psycopg
import pytest

from modal_app.specs import FUNCTION_SPECS

REPO = Path(__file__).resolve().parents[1]
NOT_ON_MODAL = {"noop"}  # a benchmark step, run only by the local pool
WEB_ENDPOINTS = ["callbacks"]  # the Modal functions that are not steps

PROBE = """
import json, os
import modal
import modal_app.app as m
assert not any(k.startswith("MODAL_TOKEN") for k in os.environ)
names = sorted(k for k, v in vars(m).items() if isinstance(v, modal.Function))
print(json.dumps({"app": m.app.name, "functions": names}))
"""


def seeded_registry(dsn: str) -> dict[str, dict[str, object]]:
    """modal_function_name -> config of the registry as migrated and seeded (the test database),
    with the step's type as config["type"]."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "select modal_function_name, config || jsonb_build_object('type', type)"
            " from enrichment_registry"
        ).fetchall()
    return {name: config for name, config in rows if name not in NOT_ON_MODAL}


def test_importing_the_app_needs_no_modal_credentials(tmp_path: Path) -> None:
    # A clean environment: no MODAL_* variables and a HOME without ~/.modal.toml.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODAL_")}
    env["HOME"] = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["app"] == "enrichment-workers"
    assert answer["functions"] == sorted([*FUNCTION_SPECS, *WEB_ENDPOINTS])


@pytest.fixture(scope="module")
def app_module() -> object:
    import modal_app.app

    return modal_app.app


def test_there_is_a_function_for_every_registry_step(dsn: str, app_module: object) -> None:
    registry = seeded_registry(dsn)
    assert registry, "the seed registers no step"
    defined = {
        name for name, value in vars(app_module).items() if isinstance(value, modal.Function)
    }
    assert defined == set(registry) | set(WEB_ENDPOINTS)
    app = vars(app_module)["app"]
    for name in registry:
        assert vars(app_module)[name].app is app


def test_function_specs_match_the_registry_timeouts(dsn: str) -> None:
    registry = seeded_registry(dsn)
    assert set(FUNCTION_SPECS) == set(registry)
    for name, config in registry.items():
        assert FUNCTION_SPECS[name].timeout_seconds == config["timeout_seconds"], name
        # An ASYNC step's function gets the callback key and the receiver's URL; a SYNC one not.
        assert FUNCTION_SPECS[name].answered_by_callback == (config["type"] == "ASYNC"), name


def test_the_receiver_is_a_web_endpoint_with_the_callback_key(app_module: object) -> None:
    receiver = vars(app_module)["callbacks"]
    assert receiver.app is vars(app_module)["app"]
    assert receiver._is_web_endpoint()  # private: modal has no public accessor
    assert not vars(app_module)["step_a"]._is_web_endpoint()
