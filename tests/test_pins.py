"""One set of pins and one Python floor for the three places that install the project's code:
pyproject.toml (the project, CI), prefect.yaml's pull step (the conductor's push-pool container)
and the Modal image (modal_app/app.py, the workers).

supabase 2.34.0 is the first release whose PyPI metadata says ``Requires-Python: >=3.11`` (2.33.0
said >=3.9), and the code needs it (``postgrest_client_retry`` and friends): a pull step installing
``supabase>=2.10`` on an older Python would get a release the code cannot use. Modal advises a
minor-version pin (py/CHANGELOG.md, 1.0.0: ``modal~=1.0.0``).
"""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml  # type: ignore[import-untyped]
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT: dict[str, Any] = tomllib.loads((ROOT / "pyproject.toml").read_text())
PULL: list[dict[str, Any]] = yaml.safe_load((ROOT / "prefect.yaml").read_text())["pull"]


def _pins(requirements: list[str]) -> dict[str, Requirement]:
    return {Requirement(r).name.lower(): Requirement(r) for r in requirements}


def project_pins() -> dict[str, Requirement]:
    """The core dependencies and the ``cloud`` extra's (Prefect, Modal, Supabase, Sentry)."""
    project = PYPROJECT["project"]
    return _pins([*project["dependencies"], *project["optional-dependencies"]["cloud"]])


def _scripts() -> list[str]:
    return [
        step["prefect.deployments.steps.run_shell_script"]["script"]
        for step in PULL
        if "prefect.deployments.steps.run_shell_script" in step
    ]


def pull_step_pins() -> dict[str, Requirement]:
    [install] = [s for s in _scripts() if "pip install" in s]
    words = shlex.split(install)
    return _pins([w for w in words[words.index("install") + 1 :] if not w.startswith("-")])


def _image_call(name: str) -> ast.Call:
    tree = ast.parse((ROOT / "modal_app" / "app.py").read_text())
    [call] = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == name
    ]
    return call


def modal_image_pins() -> dict[str, Requirement]:
    args = _image_call("pip_install").args
    return _pins([a.value for a in args if isinstance(a, ast.Constant)])


def modal_image_python() -> str:
    [version] = [k.value for k in _image_call("debian_slim").keywords if k.arg == "python_version"]
    assert isinstance(version, ast.Constant) and isinstance(version.value, str)
    return version.value


def python_floor() -> Version:
    spec = PYPROJECT["project"]["requires-python"]
    match = re.fullmatch(r">=\s*(\d+\.\d+)", spec)
    assert match, f"requires-python should be a plain floor, got {spec!r}"
    return Version(match[1])


@pytest.mark.parametrize(
    ("where", "pins"),
    [("prefect.yaml's pull step", pull_step_pins), ("the Modal image", modal_image_pins)],
)
def test_every_pin_is_pyprojects(where: str, pins: Any) -> None:
    project = project_pins()
    for name, requirement in pins().items():
        assert name in project, f"{where} installs {name}, which pyproject.toml does not list"
        assert (requirement.specifier, requirement.extras) == (
            project[name].specifier,
            project[name].extras,
        ), f"{where} pins {requirement}, pyproject.toml {project[name]}"


def test_modal_is_pinned_to_a_minor_version() -> None:
    for pins in (project_pins(), pull_step_pins()):
        spec = pins["modal"].specifier
        [clause] = list(spec)
        assert clause.operator == "~=" and len(Version(clause.version).release) == 3, spec
        installed = Version(__import__("modal").__version__)
        assert installed in spec, f"the venv's modal {installed} is outside {spec}"


def test_supabase_needs_the_python_floor() -> None:
    """supabase>=2.34 on PyPI requires Python >= 3.11: the floor can be no lower."""
    supabase = project_pins()["supabase"].specifier
    assert Version("2.33.0") not in supabase and Version("2.34.0") in supabase
    assert python_floor() >= Version("3.11")
    assert SpecifierSet(PYPROJECT["project"]["requires-python"]).contains(
        f"{sys.version_info.major}.{sys.version_info.minor}"
    ), "the venv's own Python is below requires-python"


def test_the_images_python_is_the_floor() -> None:
    floor = python_floor()
    assert Version(modal_image_python()) == floor, "modal_app/app.py debian_slim(python_version)"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == str(floor)
    # The push pool's image is Prefect's, not ours: the pull step checks its Python first, with the
    # same floor, so an older image fails with a clear message rather than a pip resolver error.
    [guard] = [s for s in _scripts() if "version_info" in s]
    assert f"sys.version_info < ({floor.major}, {floor.minor})" in guard
    assert f"Python >= {floor}" in guard
    command = [sys.executable, *shlex.split(guard)[1:]]  # `python` in the image
    ran = subprocess.run(command, capture_output=True, text=True, check=False)
    assert ran.returncode == (0 if sys.version_info >= (floor.major, floor.minor) else 1)


def test_dev_installs_the_cloud_extra() -> None:
    """`pip install -e '.[dev]'` (README, .ci/run) must bring what the cloud tests import."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    name = PYPROJECT["project"]["name"]
    assert f"{name}[cloud]" in extras["dev"]
    assert not {"prefect", "modal", "supabase", "postgrest", "sentry-sdk", "sqlalchemy"} & set(
        _pins(PYPROJECT["project"]["dependencies"])
    ), "a cloud SDK is back in the local install"


def test_prefects_extras_are_pinned_with_them() -> None:
    """pip (23.2, the venv's) picks candidates for `sqlalchemy[asyncio]`, Prefect's requirement,
    by that requirement's specifiers alone: our `<2.1` pin spelled without `[asyncio]` made it
    download every SQLAlchemy 2.1.x wheel before backtracking. A pin with an upper bound on a
    package Prefect needs with extras carries those extras."""
    ours = project_pins()
    for line in metadata.requires("prefect") or []:
        theirs = Requirement(line)
        name = theirs.name.lower()
        if theirs.marker is None and theirs.extras and name in ours:
            capped = any(c.operator in ("<", "<=", "~=", "==") for c in ours[name].specifier)
            assert not capped or theirs.extras <= ours[name].extras, (
                f"pin {name} as {name}[{','.join(sorted(theirs.extras))}]"
            )
