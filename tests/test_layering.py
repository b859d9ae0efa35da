"""The dependency rule: scoring never imports torch or training; models never imports training or service."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO


def test_scoring_imports_neither_torch_nor_training(export_family):
    artifact = export_family("llama")
    code = f"""
import sys
from models import Scorer
scorer = Scorer({str(artifact)!r}, precision="fp32", device="cpu")
scorer.score([{{"prompt": "hi", "response": "hello"}}, {{"text": "User: a\\n\\nAssistant: b"}}])
leaked = sorted(m for m in ("torch", "training", "service") if m in sys.modules)
print(",".join(leaked) or "clean")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "clean", out.stdout + out.stderr


def imported_top_level(package: str) -> set[str]:
    names = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_package_imports_follow_the_design():
    assert not imported_top_level("models") & {"training", "service"}
    assert not imported_top_level("service") & {"torch", "training"}
    assert not imported_top_level("rescore") & {"torch"}  # a rescoring box needs no torch
