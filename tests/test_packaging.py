"""What pip sees: one version, the licence file, extras that install where hetero is meant to run."""
from __future__ import annotations

import tomllib
from importlib.metadata import metadata, version
from pathlib import Path

from packaging.requirements import Requirement

from clitest import run

import hetero

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_one_version_and_hetero_version_prints_it(capsys):
    assert PYPROJECT["project"]["dynamic"] == ["version"] and "version" not in PYPROJECT["project"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hetero.version.__version__"}
    assert version("hetero") == hetero.__version__  # the installed metadata took it from there
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"hetero {hetero.__version__}"


def test_licence_file_classifiers_and_typed_packages():
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and PYPROJECT["project"]["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "Typing :: Typed" in PYPROJECT["project"]["classifiers"]
    for pkg in ("hetero", "export", "devices"):
        assert (ROOT / pkg / "py.typed").is_file() and "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"][pkg]
    assert metadata("hetero")["Requires-Python"] == ">=3.11"


def test_all_extra_installs_on_macos_without_tensorrt():
    """TensorRT has no macOS wheels; the Core ML runner is meant to run there, so hetero[all] must resolve."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    reqs = [Requirement(r) for r in extras["tensorrt"]]
    assert sorted(r.name for r in reqs) == ["cuda-python", "tensorrt"]  # the runtime, and its GPU buffers (no torch)
    for r in reqs:
        assert r.marker is not None and not r.marker.evaluate({"sys_platform": "darwin"})
        assert r.marker.evaluate({"sys_platform": "linux"})
    assert "tensorrt" in extras["all"][0]  # still part of all, where it installs
