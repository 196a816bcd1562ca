"""shared.observability: Sentry only with a DSN, never with personal data. The SDK is never really
initialised here (it would hook the whole test session): its entry points are replaced."""

from __future__ import annotations

from typing import Any

import pytest
import sentry_sdk

from shared import observability
from shared.observability import init_observability


@pytest.fixture
def sdk(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    seen: dict[str, Any] = {"init": [], "tags": {}}
    monkeypatch.setattr(sentry_sdk, "is_initialized", lambda: bool(seen["init"]))
    monkeypatch.setattr(sentry_sdk, "init", lambda **kw: seen["init"].append(kw))
    monkeypatch.setattr(sentry_sdk, "set_tag", lambda k, v: seen["tags"].__setitem__(k, v))
    for name in ("SENTRY_DSN", "SENTRY_RELEASE", "SENTRY_ENVIRONMENT", "ENRICH_ENVIRONMENT"):
        monkeypatch.delenv(name, raising=False)
    return seen


def test_off_without_a_dsn(sdk: dict[str, Any]) -> None:
    assert init_observability("conductor") is False
    assert sdk["init"] == []


def test_a_dsn_that_is_not_a_url_is_ignored(
    sdk: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SENTRY_DSN", "{{ $SENTRY_DSN }}")
    assert init_observability("conductor") is False
    assert sdk["init"] == []


def test_on_with_a_dsn_once_per_process_without_pii(
    sdk: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SENTRY_DSN", "https://public@o1.ingest.sentry.io/2")
    monkeypatch.setenv("SENTRY_RELEASE", "0123abc")
    monkeypatch.setenv("ENRICH_ENVIRONMENT", "staging")
    assert init_observability("worker", function="step_a") is True
    assert init_observability("worker", function="step_b") is True
    [options] = sdk["init"]
    assert options["release"] == "0123abc" and options["environment"] == "staging"
    assert options["send_default_pii"] is False
    assert options["include_local_variables"] is False
    assert options["max_request_body_size"] == "never"
    assert options["traces_sample_rate"] == 0.0
    assert sdk["tags"] == {"component": "worker", "function": "step_b"}


def test_before_send_drops_user_and_request() -> None:
    event = {"message": "boom", "user": {"email": "a@b.c"}, "request": {"data": "x"}}
    assert observability._scrub(event, {}) == {"message": "boom"}
