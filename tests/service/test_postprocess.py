"""Post-processing (service/postprocess.py) against direct computations of its documented formulas, and the
`polyreward score` command, which shares it with the API."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from polyreward.models.runtime.artifact import load_manifest
from polyreward.models.runtime.scorer import Scorer, ScoreResult
from polyreward.service.postprocess import Recipe, RecipeError, pair_probabilities, sigmoid

RESULT = ScoreResult(score=0.3, rewards=[1.0, -2.0, 4.0], gating=[0.2, 0.3, 0.5], tokens=7, truncated=False)


def test_sigmoid_is_stable_at_both_ends():
    for x in (-800.0, -30.0, -1.5, 0.0, 2.0, 30.0, 800.0):
        want = 1 / (1 + math.exp(-x)) if x > -700 else 0.0
        assert sigmoid(x) == pytest.approx(want, rel=1e-12, abs=1e-300)
    chosen = ScoreResult(1.0, [0.5, 0.0], [0.5, 0.5], 3, False)
    rejected = ScoreResult(-1.0, [0.0, 2.0], [0.5, 0.5], 3, False)
    p, per = pair_probabilities(chosen, rejected, ["a", "b"])
    assert p == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert per == pytest.approx({"a": 1 / (1 + math.exp(-0.5)), "b": 1 / (1 + math.exp(2.0))})


def test_recipes_follow_their_formulas(default_artifact):
    manifest = load_manifest(default_artifact)
    names, k = manifest.objective_names, len(manifest.objective_names)
    result = ScoreResult(0.3, list(np.linspace(-1, 2, k)), [1 / k] * k, 5, False)
    mean = np.array([manifest.calibration[n].mean for n in names])
    std = np.array([manifest.calibration[n].std for n in names])
    assert Recipe.build(manifest).apply(result) == (0.3, result.rewards)  # nothing asked: the raw outputs
    score, rewards = Recipe.build(manifest, normalize=True).apply(result)
    assert score == 0.3 and np.allclose(rewards, (np.array(result.rewards) - mean) / std)
    weights = {names[1]: 2.0, names[3]: -0.5}
    score, rewards = Recipe.build(manifest, weights).apply(result)
    assert (
        score == pytest.approx(2.0 * result.rewards[1] - 0.5 * result.rewards[3])
        and rewards == result.rewards
    )
    score, _ = Recipe.build(manifest, weights, normalize=True).apply(result)
    z = (np.array(result.rewards) - mean) / std
    assert score == pytest.approx(2.0 * z[1] - 0.5 * z[3])
    with pytest.raises(RecipeError, match=r"weights: unknown objectives \['nope'\]") as e:
        Recipe.build(manifest, {"nope": 1.0})
    assert e.value.type == "unknown_objective"


def test_score_command_applies_the_same_recipe(default_artifact, cli, repo, tmp_path):
    items = repo / "examples/items.jsonl"
    manifest = load_manifest(default_artifact)
    names = manifest.objective_names
    raw = Scorer(default_artifact, precision="fp32", device="cpu").score(
        [
            {k: v for k, v in json.loads(line).items() if k in ("messages", "prompt", "response", "text")}
            for line in items.read_text().splitlines()
        ]
    )
    plain = [
        json.loads(line)
        for line in cli(
            "score", default_artifact, "--input", items, "--precision", "fp32"
        ).stdout.splitlines()
    ]
    assert [r["score"] for r in plain] == pytest.approx([r.score for r in raw], abs=1e-6)
    assert all(set(r["gating"]) == set(names) for r in plain)
    weighted = cli(
        "score",
        default_artifact,
        "--input",
        items,
        "--precision",
        "fp32",
        "--weights",
        f"{names[0]}=1,{names[2]}=-2",
        "--normalize",
    )
    recipe = Recipe.build(manifest, {names[0]: 1.0, names[2]: -2.0}, normalize=True)
    for line, r in zip(weighted.stdout.splitlines(), raw, strict=True):
        row, (score, rewards) = json.loads(line), recipe.apply(r)
        assert row["score"] == pytest.approx(score, abs=1e-6) and "gating" not in row
        assert [row["rewards"][n] for n in names] == pytest.approx(rewards, abs=1e-6)
    bad = cli("score", default_artifact, "--input", items, "--weights", "helpfulness", check=False)
    assert bad.returncode == 2 and "--weights" in bad.stderr and "OBJECTIVE=WEIGHT" in bad.stderr
    unknown = cli("score", default_artifact, "--input", items, "--weights", "nope=1", check=False)
    assert unknown.returncode == 2 and "weights: unknown objectives ['nope']" in unknown.stderr
