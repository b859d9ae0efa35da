"""`polyreward tune` and the settings file `serve` reads (flags > POLYREWARD_* variables > file > defaults)."""

from __future__ import annotations

import json
import subprocess

import numpy as np
from test_cli import POLYREWARD

import service.app
from models.inputs import Item
from models.scorer import Scorer
from service.app import Settings, available_cpus


def test_tune_writes_the_fastest_candidate(export_family, tmp_path):
    out = tmp_path / "serve.json"
    r = subprocess.run(
        [POLYREWARD, "tune", str(export_family("minilm")), "--budgets", "128,1024", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    trials = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert len(trials) == 4  # two budgets × two item caps (CPU)
    written = json.loads(out.read_text())
    best = max(trials, key=lambda t: t["items_per_s"])
    assert (written["token_budget"], written["max_batch_items"]) == (
        best["token_budget"],
        best["max_batch_items"],
    )
    assert written["precision"] == "fp32" and written["device"] == "cpu"  # what `serve` would pick here
    assert f"polyreward serve --config {out}" in r.stdout
    assert (
        Settings.model_validate({k: v for k, v in written.items() if k != "tuned"}).token_budget
        == best["token_budget"]
    )


def test_settings_file_sits_below_variables_and_flags(tmp_path, monkeypatch):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"token_budget": 128, "max_batch_items": 7, "tuned": {"items_per_s": 1.0}}))
    monkeypatch.setenv("POLYREWARD_CONFIG", str(path))
    monkeypatch.setenv("POLYREWARD_MAX_BATCH_ITEMS", "9")
    settings = Settings()
    assert (settings.token_budget, settings.max_batch_items) == (128, 9)
    assert Settings(token_budget=256).token_budget == 256


def test_bad_settings_are_refused_naming_the_field(tmp_path):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"token_budget": 16}))
    r = subprocess.run(
        [POLYREWARD, "serve", "--config", str(path)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2 and "token_budget" in r.stderr and str(path) in r.stderr
    r = subprocess.run(
        [POLYREWARD, "serve", "--config", str(tmp_path / "none.json")], capture_output=True, text=True
    )
    assert r.returncode == 2 and "none.json: not found" in r.stderr
    r = subprocess.run([POLYREWARD, "tune", str(tmp_path), "--budgets", "32"], capture_output=True, text=True)
    assert r.returncode == 2 and "--budgets" in r.stderr


def test_prompt_deduplication_changes_no_score(export_family, mixed_items):
    """The GRPO benchmark's baseline (every item encodes its own prompt) scores exactly what dedup scores."""
    scorer = Scorer(export_family("minilm"), precision="fp32", device="cpu")
    group = [Item(prompt="Name a prime number.", response=r) for r in ("2", "Seven.", "9 is prime.", "11")]
    assert len(scorer.collate(scorer.encode(group))["prompt_input_ids"]) == 1
    shared = scorer.score(mixed_items + group)
    scorer.dedup_prompts = False
    assert len(scorer.collate(scorer.encode(group))["prompt_input_ids"]) == 4
    alone = scorer.score(mixed_items + group)
    assert np.allclose([r.score for r in shared], [r.score for r in alone], atol=1e-5)


def test_threads_follow_the_container_cpu_limit(tmp_path, monkeypatch):
    """A pod limited to half a CPU on a big node gets one ORT thread per batch, not one per node core."""
    limit = tmp_path / "cpu.max"
    monkeypatch.setattr(service.app, "CGROUP_CPU_MAX", limit)
    unlimited = available_cpus()  # no file: the affinity mask
    limit.write_text("50000 100000\n")
    assert available_cpus() == 1
    limit.write_text("250000 100000\n")
    assert available_cpus() == min(unlimited, 3)
    limit.write_text("max 100000\n")
    assert available_cpus() == unlimited
