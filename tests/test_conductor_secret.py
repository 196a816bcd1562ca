"""The conductor flow reads the service-role key from a Prefect Secret block, not the deployment."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
import yaml

import flows.conductor
from shared.settings import get_settings

ROOT = Path(__file__).resolve().parent.parent


class FakeSecret:
    loaded: ClassVar[list[str]] = []

    def __init__(self, value: str) -> None:
        self.value = value

    @classmethod
    async def aload(cls, name: str) -> FakeSecret:
        cls.loaded.append(name)
        return cls("service-role-key-from-block")

    def get(self) -> str:
        return self.value


@pytest.fixture
def fake_secret(monkeypatch: pytest.MonkeyPatch) -> type[FakeSecret]:
    import prefect.blocks.system

    FakeSecret.loaded = []
    monkeypatch.setattr(prefect.blocks.system, "Secret", FakeSecret)
    return FakeSecret


async def test_the_key_is_loaded_from_the_named_block(
    monkeypatch: pytest.MonkeyPatch, fake_secret: type[FakeSecret]
) -> None:
    monkeypatch.setenv(flows.conductor.SECRET_BLOCK_ENV, "enrichment-supabase-service-role-key")
    monkeypatch.delenv("SUPABASE_SERVICE_ROLE_KEY", raising=False)
    monkeypatch.setenv("SUPABASE_URL", "https://abcdefghijklmnopqrst.supabase.co")
    get_settings.cache_clear()
    try:
        await flows.conductor.load_service_role_key()
        key = get_settings().supabase_service_role_key
    finally:
        get_settings.cache_clear()

    assert fake_secret.loaded == ["enrichment-supabase-service-role-key"]
    assert key is not None and key.get_secret_value() == "service-role-key-from-block"


async def test_an_explicit_key_or_no_block_loads_nothing(
    monkeypatch: pytest.MonkeyPatch, fake_secret: type[FakeSecret]
) -> None:
    monkeypatch.delenv(flows.conductor.SECRET_BLOCK_ENV, raising=False)
    await flows.conductor.load_service_role_key()
    monkeypatch.setenv(flows.conductor.SECRET_BLOCK_ENV, "block")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "already-set")
    await flows.conductor.load_service_role_key()

    assert fake_secret.loaded == []


def test_the_deployment_names_the_block_and_stores_no_key() -> None:
    text = (ROOT / "prefect.yaml").read_text()
    config: dict[str, Any] = yaml.safe_load(text)
    [deployment] = config["deployments"]
    env = deployment["work_pool"]["job_variables"]["env"]

    assert "SUPABASE_SERVICE_ROLE_KEY" not in env
    assert env[flows.conductor.SECRET_BLOCK_ENV] == "{{ $ENRICH_SECRET_BLOCK }}"
