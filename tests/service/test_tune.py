"""`polyreward tune` and the settings file `serve` reads (flags > POLYREWARD_* variables > file > defaults)."""

from __future__ import annotations

import json

import polyreward.service.settings
from polyreward.service.settings import Settings, available_cpus, execution


def test_tune_writes_the_fastest_candidate(export_family, tmp_path, cli):
    out = tmp_path / "serve.json"
    r = cli(
        "tune", export_family("minilm"), "--budgets", "128,1024", "--repeats", "1", "--out", out, timeout=600
    )
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


def test_bad_settings_are_refused_naming_the_field(tmp_path, cli):
    path = tmp_path / "serve.json"
    path.write_text(json.dumps({"token_budget": 16}))
    r = cli("serve", "--config", path, check=False, timeout=120)
    assert r.returncode == 2 and "token_budget" in r.stderr and str(path) in r.stderr
    r = cli("serve", "--config", tmp_path / "none.json", check=False)
    assert r.returncode == 2 and "none.json: not found" in r.stderr
    r = cli("tune", tmp_path, "--budgets", "32", check=False)
    assert r.returncode == 2 and "--budgets" in r.stderr
    r = cli("serve", tmp_path, check=False)  # a directory without artifacts: refused before the port opens
    assert r.returncode == 2 and "nothing to serve" in r.stderr


def test_threads_follow_the_container_cpu_limit(tmp_path, monkeypatch):
    """A pod limited to half a CPU on a big node gets one ORT thread per batch, not one per node core."""
    limit = tmp_path / "cpu.max"
    monkeypatch.setattr(polyreward.service.settings, "CGROUP_CPU_MAX", limit)
    unlimited = available_cpus()  # no file: the affinity mask
    limit.write_text("50000 100000\n")
    assert available_cpus() == 1
    limit.write_text("250000 100000\n")
    assert available_cpus() == min(unlimited, 3)
    limit.write_text("max 100000\n")
    assert available_cpus() == unlimited


def test_execution_defaults_follow_the_device():
    cpu, gpu = execution("cpu"), execution("cuda")
    assert (cpu.workers, cpu.threads, cpu.spin, cpu.nice) == (2, available_cpus(), False, 19)
    assert (gpu.workers, gpu.threads, gpu.spin, gpu.nice) == (1, None, None, 0)
    assert execution("cpu", workers=1).spin is None  # one worker alone may spin (ORT's default)
    assert Settings(workers=3, spin=True).execution("cpu") == execution("cpu", 3, None, True)
    assert Settings(batch_nice=0).execution("cpu").nice == 0
    # a batch that starts beside another takes one thread on a CPU; not where it would not be fewer
    assert cpu.busy_threads == (1 if available_cpus() > 1 else None) and gpu.busy_threads is None
    assert (
        execution("cpu", workers=1).busy_threads is None and execution("cpu", threads=1).busy_threads is None
    )
    assert Settings(busy_threads=0).execution("cpu").busy_threads is None
