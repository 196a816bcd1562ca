"""The local install (no ``cloud`` extra): the local job runs, the cloud paths say what to install.

``pip install -e .`` installs pyproject.toml's ``dependencies`` only; Prefect, Modal, supabase-py,
Sentry and SQLAlchemy are the ``cloud`` extra. The subprocess tests simulate that install on the
full test venv: a ``sitecustomize`` on ``PYTHONPATH`` puts a meta-path finder first that refuses
every installed distribution outside the closure of the core requirements (as a core-only venv
would not have them), and logs which of the cloud SDKs anything tried to import.
"""

from __future__ import annotations

import asyncio
import importlib.abc
import importlib.metadata
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import SecretStr

from shared.extras import INSTALL_CLOUD, MissingExtra, missing_modules
from shared.observability import init_observability
from shared.settings import Settings
from shared.state_factory import open_state_api
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
CLOUD_MODULES = ("prefect", "modal", "supabase", "postgrest", "sentry_sdk", "sqlalchemy", "fastapi")
CSV = "name,website\nAcme Inc,https://www.acme.com/about\nGlobex,globex.com\n"


def core_closure() -> set[str]:
    """The distributions ``pip install .`` brings: the core requirements and, through the
    installed metadata, theirs (extras and markers as pip evaluates them)."""
    todo = [Requirement(r) for r in PROJECT["dependencies"]]
    seen: set[tuple[str, str]] = set()
    names: set[str] = set()
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        for extra in ("", *sorted(req.extras)):
            if (name, extra) in seen:
                continue
            seen.add((name, extra))
            names.add(name)
            for line in importlib.metadata.requires(req.name) or []:
                sub = Requirement(line)
                if sub.marker is None or sub.marker.evaluate({"extra": extra}):
                    todo.append(sub)
    return names


def outside_core() -> set[str]:
    """Top-level modules of installed distributions that the core install would not have."""
    core = core_closure()
    return {
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if not any(canonicalize_name(d) in core for d in dists)
    } - {"shared", "flows", "modal_app"}


BLOCKER = textwrap.dedent(
    """
    import importlib.abc, os, sys

    BLOCKED = frozenset(os.environ["TEST_BLOCKED_MODULES"].split(","))
    WATCHED = frozenset(os.environ["TEST_WATCHED_MODULES"].split(","))
    LOG = os.environ["TEST_BLOCKED_LOG"]

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            top = name.partition(".")[0]
            if top in WATCHED:
                with open(LOG, "a") as log:
                    log.write(name + "\\n")
            if top in BLOCKED:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NotInstalled())
    """
)


@pytest.fixture(scope="module")
def blocked_modules() -> set[str]:
    blocked = outside_core()
    assert set(CLOUD_MODULES) <= blocked, "a cloud SDK is in the core install"
    return blocked


@pytest.fixture
def core_only(tmp_path: Path, blocked_modules: set[str]) -> Iterator[tuple[dict[str, str], Path]]:
    """(environment, log of attempted cloud imports) for a CLI run as on a core-only install."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / "attempted.log"
    log.touch()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
        "TEST_BLOCKED_MODULES": ",".join(sorted(blocked_modules)),
        "TEST_WATCHED_MODULES": ",".join(CLOUD_MODULES),
        "TEST_BLOCKED_LOG": str(log),
        "ENRICH_HOME": str(tmp_path / "home"),
    }
    for name in ("SENTRY_DSN", "SUPABASE_URL", "SUPABASE_SERVICE_ROLE_KEY"):
        env.pop(name, None)
    yield env, log


def enrich(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shared.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def test_the_blocker_works(core_only: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, log = core_only
    ran = subprocess.run(
        [sys.executable, "-c", "import prefect"], capture_output=True, text=True, env=env
    )
    assert ran.returncode == 1 and "No module named 'prefect'" in ran.stderr
    assert log.read_text().split() == ["prefect"]


def test_the_local_job_runs_without_the_cloud_extra(
    core_only: tuple[dict[str, str], Path], dsn: str, tmp_path: Path
) -> None:
    env, log = core_only
    env["DATABASE_URL"] = dsn
    (tmp_path / "companies.csv").write_text(CSV)
    steps = "normalize_domain,clean_company_name"
    ran = enrich(env, "run", "companies.csv", "--steps", steps, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    batch = ran.stdout.strip().splitlines()[-1]
    assert "2/2 items finished" in ran.stderr
    for args in (["status", batch], ["batch", "list"], ["db", "status"]):
        done = enrich(env, *args, cwd=tmp_path)
        assert done.returncode == 0, (args, done.stderr)
    assert log.read_text() == "", "the local path tried to import a cloud SDK"


def test_serve_runs_without_the_cloud_extra(
    core_only: tuple[dict[str, str], Path], dsn: str, tmp_path: Path
) -> None:
    """`enrich serve` is local (conductor loop, workers, callback receiver): no extra needed."""
    env, log = core_only
    env["DATABASE_URL"] = dsn
    errors = tmp_path / "serve.err"
    with errors.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli.main", "serve", "--callback-port", "0"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=tmp_path,
        )
        try:
            wait_for(
                lambda: proc.poll() is not None or "serving:" in errors.read_text(), timeout=60
            )
            assert proc.poll() is None, errors.read_text()
            proc.terminate()
            assert proc.wait(timeout=30) == 0, errors.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "stopped:" in errors.read_text()
    assert log.read_text() == "", "serve tried to import a cloud SDK"


def test_dev_up_without_the_cloud_extra_says_what_to_install(
    core_only: tuple[dict[str, str], Path], dsn: str, tmp_path: Path
) -> None:
    env, _ = core_only
    env["DATABASE_URL"] = dsn
    home = tmp_path / "dev-home"
    try:
        ran = enrich(env, "dev", "up", "--home", str(home), "--timeout", "5", cwd=tmp_path)
        touched = (home / "dev").exists()
    finally:  # before the check existed, `up` started parts before finding Prefect missing
        enrich({**env, "PYTHONPATH": ""}, "dev", "down", "--home", str(home), cwd=tmp_path)
    assert ran.returncode != 0
    [line] = ran.stderr.strip().splitlines()  # one line, however the CLI prefixes its errors
    assert line.endswith(
        f"MissingExtra: enrich dev up needs the cloud extra (prefect is not installed): "
        f"{INSTALL_CLOUD}"
    ), line
    assert not touched, "nothing is started or written first"


def test_the_models_without_sqlalchemy_say_what_to_install(
    core_only: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    env, _ = core_only
    ran = subprocess.run(
        [sys.executable, "-c", "import shared.models"], capture_output=True, text=True, env=env
    )
    assert ran.returncode == 1
    assert ran.stderr.strip().splitlines()[-1] == (
        f"ImportError: shared.models needs the cloud extra (sqlalchemy is not installed): "
        f"{INSTALL_CLOUD}"
    )


# In this process: the Supabase State API and Sentry with their SDKs made unimportable ------------


class _Refuse(importlib.abc.MetaPathFinder):
    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = frozenset(modules)

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if name.partition(".")[0] in self.modules:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def uninstall(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make ``modules`` unimportable until the test ends (monkeypatch restores sys.modules)."""
    for name in list(sys.modules):
        if name.partition(".")[0] in modules or name == "shared.supabase_state":
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_Refuse(modules), *sys.meta_path])


def test_the_supabase_state_api_without_the_cloud_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    uninstall(monkeypatch, "supabase", "postgrest")
    settings = Settings(
        supabase_url="https://abc.supabase.co",
        supabase_service_role_key=SecretStr("service-role-key"),
    )
    with pytest.raises(MissingExtra) as raised:
        asyncio.run(open_state_api(settings))
    assert str(raised.value) == (
        "the Supabase State API (SUPABASE_URL) needs the cloud extra (supabase, postgrest are "
        f"not installed): {INSTALL_CLOUD}"
    )


def test_sentry_without_the_cloud_extra_warns_and_the_work_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    uninstall(monkeypatch, "sentry_sdk")
    monkeypatch.setenv("SENTRY_DSN", "https://public@o1.ingest.sentry.io/2")
    with caplog.at_level(logging.WARNING, logger="shared.observability"):
        assert init_observability("worker") is False
    assert [r.getMessage() for r in caplog.records] == [
        f"SENTRY_DSN needs the cloud extra (sentry_sdk is not installed): {INSTALL_CLOUD}; "
        "error reporting stays off"
    ]


def test_a_folder_of_the_same_name_is_not_the_package(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """From the repo's root, ``supabase/`` (SQL) is a namespace package named like supabase-py."""
    (tmp_path / "enrich_test_sdk").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert missing_modules("enrich_test_sdk", "json") == ["enrich_test_sdk"]
