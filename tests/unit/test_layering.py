"""One package, one direction: the code installs under the single import name ``rlhf_pipeline`` and its layers import
one way, flows → tasks → models (read from the source with ``ast``; imports inside functions count too)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

PACKAGE = "rlhf_pipeline"
LAYERS = ("models", "tasks", "flows", "infra")  # lowest first: a layer may import only the layers below it
#: libraries of the orchestration that the stage and model layers never import
ORCHESTRATION = ("prefect", "mlflow", "ray")


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every import in ``path`` (``from a.b import c`` gives ``a.b`` and ``a.b.c``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.append((node.lineno, "." * node.level + (node.module or "")))
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def violations(layer: str) -> list[str]:
    """Every import in the folder ``layer`` that goes up a layer, names a fixed folder without the package, is
    relative, or (below flows) reaches for Prefect, MLflow or Ray."""
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    bad = []
    for path in sorted((PROJECT_ROOT / layer).glob("*.py")):
        for line, module in imports_of(path):
            where = f"{path.relative_to(PROJECT_ROOT)}:{line}: {module}"
            top = module.split(".")[0]
            if module.startswith("."):
                bad.append(f"{where} (relative import; use {PACKAGE}.<layer>)")
            elif top in LAYERS:
                bad.append(f"{where} (bare top-level name; use {PACKAGE}.{module})")
            elif top == PACKAGE:
                target = module.split(".")[1] if "." in module else ""
                if target not in allowed:
                    bad.append(f"{where} (goes up: {layer} may import {', '.join(sorted(allowed))})")
            elif top in ORCHESTRATION and layer in ("models", "tasks"):
                bad.append(f"{where} ({layer} never imports {top}: orchestration lives in flows)")
    return bad


@pytest.mark.parametrize("layer", LAYERS)
def test_imports_go_one_way(layer):
    assert violations(layer) == []


def test_the_checker_catches_an_upward_import(tmp_path, monkeypatch):
    """The rule itself: a planted upward import, a bare name and an MLflow import in tasks/ are each reported."""
    fake = tmp_path / "tasks"
    fake.mkdir()
    (fake / "bad.py").write_text("import mlflow\nfrom tasks.sft import run_sft\n\n\ndef f():\n"
                                 "    from rlhf_pipeline.flows.config import Config\n")
    monkeypatch.setattr(sys.modules[__name__], "PROJECT_ROOT", tmp_path)
    found = violations("tasks")
    assert [v.split(" (")[0] for v in found] == ["tasks/bad.py:1: mlflow", "tasks/bad.py:2: tasks.sft",
                                                 "tasks/bad.py:6: rlhf_pipeline.flows.config"]


def test_a_wheel_holds_one_top_level_name(tmp_path):
    """``pip wheel --no-deps .`` gives one wheel whose only top-level name is the package (no top-level ``flows``,
    ``tasks`` or ``models`` in site-packages), with the infra templates as package data."""
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info/ beside the sources
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(PROJECT_ROOT / name, source / name)
    for layer in LAYERS:
        shutil.copytree(PROJECT_ROOT / layer, source / layer, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path), str(source)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(tmp_path.glob("rlhf_pipeline-*.whl"))
    assert len(wheels) == 1
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = wheel.namelist()
        top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
        assert wheel.read(top_level).decode().split() == [PACKAGE]
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {PACKAGE}
    for module in ("flows/pipeline.py", "tasks/ppo.py", "models/losses.py", "infra/services.py",
                   "infra/prefect.yaml", "infra/k8s-base-job-template.json"):
        assert f"{PACKAGE}/{module}" in names
