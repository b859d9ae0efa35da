"""A mixture model served by the real `polyreward serve` on 127.0.0.1: the group outputs, the aggregates over
groups, and `/v1/adapt` for a user from one group, each checked against a direct computation."""

from __future__ import annotations

import gzip
import json

import httpx
import numpy as np
import pytest
import torch

from polyreward.models.runtime.adapt import DEFAULT_STRENGTH
from polyreward.models.runtime.manifest import CalibrationStat
from polyreward.models.runtime.objectives import Objective
from polyreward.models.torch.export import ExportOptions, export_artifact
from polyreward.models.torch.heads import (
    GatingConfig,
    HeadsConfig,
    MixtureConfig,
    RewardHeads,
    load_heads,
    save_heads,
)  # fmt: skip
from polyreward.service.client import RewardClient

pytestmark = pytest.mark.slow

ADAPT_PAIRS, HELD_OUT = 32, 128
GROUP_STATS = {"a": (1.0, 2.0), "b": (-0.5, 0.5)}  # each group score's (mean, std), as training records them


@pytest.fixture(scope="module")
def mixture_artifact(tmp_path_factory, backbone_dirs):
    """MiniLM with hand-set mixture heads: group 'a' weighs objective0, group 'b' objective2; the router puts
    most prompts in 'a'. The rewards are scaled to Bradley–Terry margins of a few units, as trained ones are."""
    root = tmp_path_factory.mktemp("mixture")
    torch.manual_seed(0)
    cfg = HeadsConfig(
        objectives=[Objective(name=f"objective{i}") for i in range(3)], hidden_size=384, kind="mixture",
        mixture=MixtureConfig(groups=["a", "b"], router=GatingConfig(temperature=1.0, hidden_dim=16, n_hidden=1)),
    )  # fmt: skip
    heads = RewardHeads(cfg)
    with torch.no_grad():
        heads.regression.weight.mul_(150.0)
        heads.mixture.group_logits.copy_(torch.tensor([[8.0, 0, 0], [0, 0, 8.0]]))
        heads.mixture.router.layers[-1].bias.copy_(torch.tensor([1.5, -1.5]))
    save_heads(heads, root / "heads.safetensors")
    stats = {name: CalibrationStat(mean=m, std=sd) for name, (m, sd) in GROUP_STATS.items()}
    options = ExportOptions(precisions=["fp32"], max_length=128, name="mixture", group_calibration=stats)
    export_artifact(backbone_dirs["minilm"], root / "heads.safetensors", root / "artifact", options)
    return root / "artifact"


@pytest.fixture(scope="module")
def server(serve, mixture_artifact, minilm_artifact):
    with (
        serve(mixture_artifact, minilm_artifact, request_timeout="600") as (url, _),
        httpx.Client(base_url=url, timeout=600) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def user_pairs(server, data_dir):
    """Pairs labelled by a user of group 'b': P(first ≻ second) = σ(s_b(first) − s_b(second)), seeded."""
    with gzip.open(data_dir / "ultrafeedback_binarized_subset" / "test.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line, _ in zip(f, range(ADAPT_PAIRS + HELD_OUT), strict=False)]
    pairs = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
             for r in rows]  # fmt: skip
    scored = score(server, [it for p in pairs for it in items(p)])
    s_b = np.array([r["group_scores"][1] for r in scored["results"]])
    rng = np.random.default_rng(0)
    first_wins = rng.random(len(pairs)) < 1 / (1 + np.exp(-(s_b[0::2] - s_b[1::2])))
    labelled = [p if win else {**p, "chosen": p["rejected"], "rejected": p["chosen"]}
                for p, win in zip(pairs, first_wins, strict=True)]  # fmt: skip
    return labelled[:ADAPT_PAIRS], labelled[ADAPT_PAIRS:]


def items(pair: dict) -> list[dict]:
    return [{"prompt": pair["prompt"], "response": pair[side]} for side in ("chosen", "rejected")]


def score(client: httpx.Client, batch: list[dict], **recipe) -> dict:
    """/v1/score on the mixture model, 64 items a request."""
    out: dict = {}
    for start in range(0, len(batch), 64):
        r = client.post("/v1/score", json={"model": "mixture", "items": batch[start : start + 64], **recipe})
        assert r.status_code == 200, r.text
        results = out.get("results", []) + r.json()["results"]
        out = {**r.json(), "results": results}
    return out


def accuracy(client: httpx.Client, pairs: list[dict], **recipe) -> float:
    s = np.array(
        [r["score"] for r in score(client, [it for p in pairs for it in items(p)], **recipe)["results"]]
    )
    return float((s[0::2] > s[1::2]).mean())


def test_models_and_scores_carry_the_groups(server, user_pairs, mixture_artifact):
    model = next(m for m in server.get("/v1/models").json()["models"] if m["name"] == "mixture")
    assert (model["head"], model["groups"], model["routing"]) == ("mixture", ["a", "b"], "latent")
    batch = [it for p in user_pairs[1][:8] for it in items(p)]
    out = score(server, batch)
    assert out["groups"] == ["a", "b"]
    probs = np.array([r["group_probs"] for r in out["results"]])
    scores = np.array([r["group_scores"] for r in out["results"]])
    x = np.array([r["rewards"] for r in out["results"]])  # the debiased objectives
    gating = np.array([r["gating"] for r in out["results"]])
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and probs[:, 0].mean() > 0.8  # most prompts in 'a'
    # The default aggregate is the router's mixture; group 'a' weighs objective0, 'b' objective2.
    assert np.allclose([r["score"] for r in out["results"]], (probs * scores).sum(1), atol=1e-4)
    assert np.allclose(scores, x[:, [0, 2]], atol=1e-2 * np.abs(x).max())
    assert np.allclose((gating * x).sum(1), (probs * scores).sum(1), atol=1e-4)
    one = score(server, batch, group_weights={"b": 1.0})
    assert one["recipe"]["group_weights"] == {"b": 1.0}
    assert np.allclose([r["score"] for r in one["results"]], scores[:, 1], atol=1e-4)
    # group_weights reweight the router: π' ∝ π ⊙ w.
    tilted = score(server, batch, aggregate="groups", group_weights={"a": 1.0, "b": 3.0})
    want = probs * [1.0, 3.0]
    want = (want / want.sum(1, keepdims=True) * scores).sum(1)
    assert np.allclose([r["score"] for r in tilted["results"]], want, atol=1e-4)
    offset = score(server, batch, gating_offset={"objective1": 2.0})  # Σ (g + δ) x
    assert np.allclose(
        [r["score"] for r in offset["results"]], (probs * scores).sum(1) + 2 * x[:, 1], atol=1e-4
    )
    # MaxMin compares the groups' standardized scores (s_m − μ_m) / σ_m.
    mean, std = np.array(list(GROUP_STATS.values())).T
    worst = score(server, batch, aggregate="worst_group")
    assert np.allclose([r["score"] for r in worst["results"]], ((scores - mean) / std).min(1), atol=1e-4)
    # With a transform, s_m = Σ_k G_mk u_k on u = log σ(x − ref), and the same standardization.
    ref = {"objective0": 0.5, "objective1": 0.0, "objective2": -0.5}
    out = score(server, batch, aggregate="worst_group", transform={"reference": ref})
    g = load_heads(mixture_artifact.parent / "heads.safetensors").mixture.group_gating(torch.zeros(1, 384))
    u = -np.logaddexp(0, -(x - list(ref.values())))
    want = ((u @ g[0].detach().double().numpy().T - mean) / std).min(1)
    assert np.allclose([r["score"] for r in out["results"]], want, atol=1e-4)


def test_adapt_over_groups_finds_the_users_group_and_beats_the_population(server, user_pairs):
    train, test = user_pairs
    r = server.post("/v1/adapt", json={"model": "mixture", "pairs": train})
    assert r.status_code == 200, r.text
    out = r.json()
    assert (out["over"], out["pairs"], out["profile"]["aggregate"]) == ("groups", ADAPT_PAIRS, "groups")
    # The evidence, computed directly: w_m ∝ Π_i σ(s_m(chosen_i) − s_m(rejected_i)).
    scored = score(server, [it for p in train for it in items(p)])["results"]
    s = np.array([r["group_scores"] for r in scored])
    log_w = -np.logaddexp(0, -(s[0::2] - s[1::2])).sum(0)
    want = np.exp(log_w - log_w.max()) / np.exp(log_w - log_w.max()).sum()
    assert np.allclose([out["group_weights"][g] for g in ("a", "b")], want, atol=1e-4)
    assert out["group_weights"]["b"] > 0.9
    assert out["fit"]["log_likelihood"] > out["fit"]["population_log_likelihood"]
    adapted, population = accuracy(server, test, **out["profile"]), accuracy(server, test)
    assert adapted > population + 0.1, (adapted, population)


def test_adapt_over_objectives_is_the_map_offset_and_beats_the_population(server, user_pairs):
    train, test = user_pairs
    with RewardClient(
        str(server.base_url), model="mixture", timeout=600
    ) as rm:  # the Python client's own call
        out = rm.adapt(train, over="objectives").model_dump(exclude_none=True)
    assert out["profile"] == {"aggregate": "gating", "gating_offset": out["gating_offset"]}
    d = np.array([out["gating_offset"][f"objective{k}"] for k in range(3)])
    # At the MAP the gradient of Σ log(1 + e^{−(m + δ·Δ)}) + (λ/2)‖δ‖² vanishes (λ the default, m the model's
    # margin).
    scored = score(server, [it for p in train for it in items(p)])["results"]
    x = np.array([r["rewards"] for r in scored])
    delta, m = (
        x[0::2] - x[1::2],
        np.array([c["score"] - r["score"] for c, r in zip(scored[0::2], scored[1::2], strict=True)]),
    )
    grad = -(delta / (1 + np.exp(m + delta @ d))[:, None]).sum(0) + DEFAULT_STRENGTH * d
    assert np.abs(grad).max() < 1e-4
    w = np.array([out["weights"][f"objective{k}"] for k in range(3)])  # mean gating + δ
    assert w[2] > w[0]  # the user weighs objective2, as group 'b' does
    adapted, population = accuracy(server, test, **out["profile"]), accuracy(server, test)
    assert adapted > population + 0.1, (adapted, population)


@pytest.mark.parametrize(
    "body,status,field",
    [
        ({"model": "mixture", "pairs": []}, 422, "pairs"),
        ({"model": "mixture", "pairs": [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 257}, 422, "pairs"),
        ({"model": "mixture", "pairs": [{"prompt": "p", "chosen": "a"}]}, 422, "rejected"),
        ({"model": "mixture", "pairs": [{"prompt": "p", "chosen": "a", "rejected": "b"}], "strength": 0}, 422,
         "strength"),
        ({"model": "mixture", "pairs": [{"prompt": "p", "chosen": "a", "rejected": "b"}], "strength": 5e-324},
         422, "strength"),  # schemathesis found a denormal λ: a singular Newton system
        ({"model": "mixture", "pairs": [{"prompt": "p", "chosen": "a", "rejected": "b"}], "over": "people"}, 422,
         "over"),
        ({"model": "random-minilm", "pairs": [{"prompt": "p", "chosen": "a", "rejected": "b"}], "over": "groups"},
         422, "over"),
    ],
)  # fmt: skip
def test_adapt_rejects_bad_input_naming_the_field(server, error_of, body, status, field):
    assert field in error_of(server.post("/v1/adapt", json=body), status)


@pytest.mark.parametrize(
    "model,recipe,field",
    [
        ("mixture", {"group_weights": {"c": 1.0}}, "group_weights"),
        ("mixture", {"aggregate": "groups"}, "group_weights"),
        ("mixture", {"aggregate": "worst_group", "weights": {"objective0": 1.0}}, "weights"),
        ("mixture", {"group_weights": {"a": float("nan")}}, "group_weights"),
        ("mixture", {"group_weights": {"a": -1.0}}, "group_weights"),
        ("mixture", {"group_weights": {"a": 0.0}}, "group_weights"),
        ("mixture", {"aggregate": "worst_group", "gating_offset": {"objective0": 1.0}}, "gating_offset"),
        ("mixture", {"gating_offset": {"objective9": 1.0}}, "gating_offset"),
        ("random-minilm", {"aggregate": "worst_group"}, "aggregate"),
        ("random-minilm", {"group_weights": {"a": 1.0}}, "group_weights"),
    ],
)
def test_group_recipes_reject_bad_input_naming_the_field(server, error_of, model, recipe, field):
    body = json.dumps({"model": model, "items": [{"prompt": "p", "response": "r"}], **recipe})
    r = server.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert field in error_of(r, r.status_code) and 400 <= r.status_code < 500
