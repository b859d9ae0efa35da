"""The training pipeline through the real CLI: config errors, resumable featurization, the small recipe, eval."""

from __future__ import annotations

import gzip
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from polyreward.models.runtime.items import PromptItem
from polyreward.models.runtime.scorer import Scorer

pytestmark = pytest.mark.slow

WORDS = [
    "the",
    "a",
    "model",
    "reward",
    "answer",
    "helpful",
    "careful",
    "clear",
    "short",
    "long",
    "detail",
    "example",
    "reason",
    "because",
]


def synthetic_config(root: Path, n: int = 1200, **featurize) -> Path:
    """A ratings dataset of varied-length texts and a config embedding it with small shards."""
    rng = np.random.default_rng(1)
    with open(root / "ratings.jsonl", "w") as f:
        for i in range(n):
            words = rng.choice(WORDS, size=int(rng.integers(3, 60)))
            row = {
                "uid": f"r{i}",
                "question": f"Question {i % 97}: explain item {i % 13}?",
                "answer": " ".join(words),
                "scores": {"quality": float(rng.integers(1, 6))},
            }
            f.write(json.dumps(row) + "\n")
    opts = {"max_length": 64, "max_items": 32, "shard_items": 128, **featurize}
    (root / "train.yaml").write_text(
        "featurize: " + json.dumps(opts) + "\n"
        "datasets:\n"
        "  - {name: synth, path: ratings.jsonl, kind: ratings, id: uid, prompt: question, response: answer,"
        " ratings: scores}\n"
    )
    return root / "train.yaml"


def test_wrong_field_name_fails_before_any_compute(tmp_path, cli):
    config = synthetic_config(tmp_path, n=20)
    config.write_text(config.read_text().replace("response: answer", "response: anser"))
    proc = cli("train", "--config", config, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 2
    assert "anser" in proc.stderr and "ratings.jsonl:1" in proc.stderr and "response" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "features").exists()  # nothing was embedded


def test_misspelt_option_is_named(tmp_path, cli):
    config = synthetic_config(tmp_path, n=20)
    config.write_text(config.read_text() + "stage2: {tresholds: 0.1}\n")
    proc = cli("train", "objectives", "--config", config, check=False)
    assert proc.returncode == 2 and "stage2.tresholds" in proc.stderr


def _cached_embeddings(config: Path, out: Path) -> np.ndarray:
    from polyreward.training.config import load_config
    from polyreward.training.pipeline import Run

    run = Run(load_config(config, out=str(out)), progress=False)
    feats = run.features  # everything is cached: nothing is computed here
    return np.concatenate([feats.reward, feats.gating], 1)


def test_killed_featurization_resumes_to_identical_embeddings(tmp_path, cli, polyreward_bin):
    config = synthetic_config(tmp_path, n=640)  # 5 shards of 128: killed after 3
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        [polyreward_bin, "train", "featurize", "--config", config, "--out", killed, "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while len(list(killed.glob("features/*/shard-*.safetensors"))) < 3:
        assert proc.poll() is None, f"featurization ended before it could be killed: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no shard written in time"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    shards_at_kill = len(list(killed.glob("features/*/shard-*.safetensors")))
    resumed = cli("train", "featurize", "--config", config, "--out", killed, "--quiet")
    cached = int(resumed.stderr.split(" cached, ")[0].rsplit("; ", 1)[1])
    assert cached >= shards_at_kill * 128  # the rerun reused what the killed run committed
    cli("train", "featurize", "--config", config, "--out", clean, "--quiet")
    a, b = _cached_embeddings(config, killed), _cached_embeddings(config, clean)
    assert a.shape == b.shape and a.shape[0] == 640
    assert np.array_equal(a, b)


def test_finetune_command_trains_and_exports(tmp_path, cli):
    config = synthetic_config(tmp_path, n=60)
    config.write_text(config.read_text() + "finetune: {max_steps: 3, batch_size: 4, max_length: 64}\n")
    proc = cli("train", "finetune", "--config", config, "--out", tmp_path / "out", "--quiet")
    metrics = json.loads(proc.stdout)
    assert metrics["steps"] == 3 and metrics["lora"] is True
    artifact = tmp_path / "out/finetune/artifact"
    scorer = Scorer(artifact, precision="fp32", device="cpu")
    assert scorer.objectives == ["quality"] and scorer.manifest.input.max_length == 64
    assert len(scorer.score([PromptItem(prompt="hi", response="hello there")])) == 1


@pytest.fixture(scope="module")
def small_run(tmp_path_factory, data_dir, cli, repo):
    """configs/small.yaml, the recipe the tests use, run end to end through the CLI on the real data. (How long
    it takes is measured, not asserted: that is for bench/, not for a test on a shared machine.)"""
    out = tmp_path_factory.mktemp("small")
    cli(
        "train",
        "--config",
        repo / "configs/small.yaml",
        "--out",
        out,
        "--quiet",
        timeout=900,
        env={"POLYREWARD_DATA": str(data_dir)},
    )
    return out


def test_small_recipe_trains_exports_and_reports(small_run):
    out = small_run
    report = json.loads((out / "artifact/report.json").read_text())
    stage1 = json.loads((out / "stage1.json").read_text())
    rated = [name for name, r in stage1.items() if r["kind"] == "ridge"]
    assert rated and set(rated) <= set(report["ratings"])
    for name in rated:  # every rated objective has a held-out Spearman
        assert -1 <= report["ratings"][name]["spearman"] <= 1
    assert stage1["harmlessness"]["kind"] == "bradley-terry"
    assert 0 <= report["accuracy"] <= 1 and report["n"] > 50
    assert {"hh_harmless", "ultrafeedback"} <= set(report["subsets"])
    held_out = report["baselines_from_embeddings"]
    # The embeddings-based gated accuracy and the ONNX eval agree (same pairs, same model).
    assert abs(held_out["gated"]["accuracy"] - report["accuracy"]) < 0.02
    assert {"uniform_average", "linear_probe"} <= set(held_out)
    for png in ("objective_correlation.png", "gating_by_subset.png", "calibration.png"):
        assert (out / "artifact" / png).stat().st_size > 1000


@pytest.mark.parametrize("routing", ["latent", "category"])
def test_mixture_command_trains_exports_and_reports(small_run, routing, cli, repo, data_dir):
    proc = cli(
        "train", "mixture", "--config", repo / "configs/small.yaml", "--out", small_run, "--routing", routing,
        "--groups", "1", "--groups", "2", "--quiet", timeout=900, env={"POLYREWARD_DATA": str(data_dir)},
    )  # fmt: skip
    printed = json.loads(proc.stdout)
    work = small_run / f"mixture-{routing}"
    fit = json.loads((work / "mixture.json").read_text())
    assert printed["fit"] == fit["fit"]
    held_out = fit["held_out"]
    assert {"mixture", "gated", "linear_probe", "uniform_average"} <= set(held_out)
    for name in ("mixture", "gated", "linear_probe"):
        row = held_out[name]
        assert 0 <= row["worst_label"] <= 1 and min(row["labels"].values()) == row["worst_label"]
    assert -1 <= held_out["mixture"]["ari"] <= 1 and "ari" not in held_out["linear_probe"]
    scorer = Scorer(work / "artifact", precision="fp32", device="cpu")
    head = scorer.manifest.head
    assert head.kind == "mixture" and head.routing == routing and head.groups == fit["groups"]
    # worst_group's units: each group score's mean and std on the training responses, as mixture.json has them.
    stats = {g: c.model_dump() for g, c in head.group_calibration.items()}
    assert stats == fit["group_calibration"] and min(c["std"] for c in stats.values()) > 0
    if routing == "latent":
        assert fit["fit"]["groups"] in (1, 2) and set(fit["fit"]["candidates"]) == {"1", "2"}
    else:
        assert fit["fit"]["router_val_accuracy"] > 0.5 and "hh_harmless" in head.groups
    (result,) = scorer.score([PromptItem(prompt="How do I bake bread?", response="Mix flour and water.")])
    assert len(result.group_probs) == len(head.groups) and abs(sum(result.group_probs) - 1) < 1e-5
    report = json.loads((work / "artifact/report.json").read_text())
    groups = report["groups"]
    assert groups["worst_label_accuracy"] == min(groups["accuracy_by_label"].values())
    assert -1 <= groups["ari"] <= 1
    for curve in groups["few_shot"].values():
        assert [r["k"] for r in curve["curve"]] == [4, 8, 16, 32, 64]
        assert {"population", "objectives", "groups"} == set(curve["curve"][0]) - {"k"}
    assert (work / "artifact/few_shot.png").exists() == bool(groups["few_shot"])


def test_eval_command_on_a_canonical_pairs_file(small_run, data_dir, tmp_path, cli):
    out = small_run
    pairs = tmp_path / "pairs.jsonl"
    with (
        gzip.open(data_dir / "ultrafeedback_binarized_subset/test.jsonl.gz", "rt") as f,
        open(pairs, "w") as g,
    ):
        for i, line in enumerate(f):
            if i == 40:
                break
            row = json.loads(line)
            subset = "odd" if i % 2 else "even"
            g.write(
                json.dumps(
                    {
                        "prompt": row["prompt"],
                        "chosen": row["chosen"],
                        "rejected": row["rejected"],
                        "subset": subset,
                    }
                )
                + "\n"
            )
    proc = cli("eval", out / "artifact", "--data", pairs, "--json")
    report = json.loads(proc.stdout)
    assert report["n"] == 40 and 0 <= report["accuracy"] <= 1
    assert {"pairs/even", "pairs/odd"} <= set(report["subsets"])
    assert report["length_bias"]["n"] == 80
    assert "rules" not in report

    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n  long: {kind: length, min: 150, tolerance: 150}\n  listed: {kind: format, pattern: '(?m)^ *[0-9]+\\. '}\n"
    )
    with_rules = json.loads(cli("eval", out / "artifact", "--data", pairs, "--json", "--rules", rules).stdout)
    assert with_rules["accuracy"] == report["accuracy"]  # nothing to strip: the learned report is unchanged
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    long = lambda text: max(0.0, 1 - max(0, 150 - len(text.split())) / 150)  # noqa: E731
    got = with_rules["rules"]["long"]
    assert got["kind"] == "length" and got["pairs"]["n"] == 40
    assert got["mean"] == pytest.approx(sum(long(r["chosen"]) + long(r["rejected"]) for r in rows) / 80)
    assert got["pairs"]["prefers_chosen"] == pytest.approx(
        sum(long(r["chosen"]) > long(r["rejected"]) for r in rows) / 40
    )
    listed = [re.search(r"(?m)^ *[0-9]+\. ", r["chosen"]) is not None for r in rows]
    assert with_rules["rules"]["listed"]["mean"] >= 0 and 0 < sum(listed) < 40
