"""The layout and the dependency rule (docs/architecture.md): one `polyreward` namespace, the runtime imports
only the runtime, scoring and serving never import torch or training, no module over 400 lines."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

PACKAGES = {
    "models",
    "service",
    "training",
    "rescore",
}  # the design card's folders, installed as polyreward.*


def python_files(repo: Path, *folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (repo / folder).rglob("*.py"))


def imports(path: Path) -> set[str]:
    """Every module a file imports, absolute and dotted (`from a.b import c` counts as a.b and a.b.c)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def offending(repo: Path, folder: str, forbidden: tuple[str, ...], allowed: tuple[str, ...] = ()) -> dict:
    found = {}
    for path in python_files(repo, folder):
        bad = {
            m for m in imports(path)
            if any(m == f or m.startswith(f + ".") for f in forbidden) and not m.startswith(allowed or ("\0",))
        }  # fmt: skip
        if bad:
            found[str(path.relative_to(repo))] = sorted(bad)
    return found


def test_the_runtime_imports_only_the_runtime(repo):
    polyreward_imports = {
        str(p.relative_to(repo)): sorted(
            m
            for m in imports(p)
            if m.startswith("polyreward") and not m.startswith("polyreward.models.runtime")
        )
        for p in python_files(repo, "models/runtime")
    }
    assert not {k: v for k, v in polyreward_imports.items() if v}
    assert not offending(repo, "models/runtime", ("torch",))


def test_the_packages_follow_the_dependency_rule(repo):
    training_internals = ("polyreward.training",)
    assert not offending(repo, "models", ("polyreward.training", "polyreward.service", "polyreward.rescore"))
    assert not offending(repo, "service", ("torch", "polyreward.models.torch", *training_internals))
    assert not offending(
        repo,
        "rescore",
        ("torch", "polyreward.models.torch", *training_internals),
        ("polyreward.training.data",),
    )
    assert not offending(
        repo,
        "training/data",
        ("torch", "polyreward.models.torch", *training_internals),
        ("polyreward.training.data",),
    )


def test_everything_imports_through_the_namespace(repo):
    """A user's own `models/` or `service.py` would shadow bare names; no code of ours may use them."""
    bare = {
        str(p.relative_to(repo)): sorted(m for m in imports(p) if m.split(".")[0] in PACKAGES)
        for p in python_files(repo, *PACKAGES, "tests", "bench")
    }
    assert not {k: v for k, v in bare.items() if v}


def test_the_wheel_lists_every_package(repo):
    config = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {folder: name for name, folder in config["package-dir"].items()}
    folders = [
        p.parent.relative_to(repo).as_posix()
        for p in python_files(repo, *PACKAGES)
        if p.name == "__init__.py"
    ]
    expected = {mapped[f.split("/")[0]] + "".join("." + part for part in f.split("/")[1:]) for f in folders}
    assert set(config["packages"]) == expected


def test_no_test_module_imports_another(repo):
    for path in python_files(repo, "tests"):
        names = {m.split(".")[0] for m in imports(path)}
        assert not {n for n in names if n.startswith("test_") or n == "conftest"}, path


@pytest.mark.parametrize("folder", [*sorted(PACKAGES), "tests", "bench"])
def test_no_module_over_400_lines(repo, folder):
    long = {
        str(p.relative_to(repo)): n
        for p in python_files(repo, folder)
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long


def test_scoring_and_serving_import_neither_torch_nor_training(export_family):
    artifact = export_family("llama")
    code = f"""
import sys
from polyreward.models import Scorer
from polyreward.service.app import create_app
from polyreward.service.client import RewardClient
scorer = Scorer({str(artifact)!r}, precision="fp32", device="cpu")
scorer.score([{{"prompt": "hi", "response": "hello"}}, {{"text": "User: a\\n\\nAssistant: b"}}])
create_app([])
leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith(("polyreward.training", "polyreward.models.torch")))
print(",".join(leaked) or "clean")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "clean", out.stdout + out.stderr
