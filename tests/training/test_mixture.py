"""Latent preference groups and task-category routing on synthetic pairs from two known groups (no backbone)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from polyreward.training.mixture import (
    MixtureTrainConfig,
    categories,
    category_of,
    fit_latent,
    fit_routed,
    mixture_nll,
    one_standard_error,
    pair_nll,
)
from polyreward.training.stage2 import PairTensors, Stage2Config, train_gating

# Two groups of raters weigh four debiased objectives differently; each rates the prompts of its own cluster.
WEIGHTS = np.array([[3.0, 0.0, 0.5, 0.0], [0.0, 0.5, 3.0, 0.0]])
D = 32


def two_groups(n: int, rng: np.random.Generator, centers: np.ndarray) -> tuple[PairTensors, np.ndarray]:
    """n pairs: a prompt near its group's centre, Δ ~ N(0, I), chosen with P = σ(w_g · Δ) (else Δ flips)."""
    group = rng.integers(0, 2, n)
    x = centers[group] + rng.normal(0, 0.5 / np.sqrt(D), (n, D))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    delta = rng.normal(0, 1, (n, 4))
    chosen = rng.random(n) < 1 / (1 + np.exp(-(WEIGHTS[group] * delta).sum(1)))
    delta[~chosen] *= -1
    return PairTensors(delta=delta, gating_emb=x.astype(np.float32), weight=np.ones(n)), group


@pytest.fixture(scope="module")
def pairs():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 1, (2, D))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    return tuple(two_groups(n, rng, centers) for n in (1000, 250, 4000))  # train, validation, test


def held_out(probs: torch.Tensor, gating: torch.Tensor, test: PairTensors) -> tuple[float, float]:
    """(accuracy of the served score Σ_m π_m G_m · Δ, mean −log P(chosen) under the model's own likelihood)."""
    delta = torch.tensor(test.delta, dtype=torch.float32)
    margin = ((probs[:, :, None] * gating).sum(1) * delta).sum(-1)
    log_p = torch.nn.functional.logsigmoid((gating * delta[:, None, :]).sum(-1))
    nll = -torch.logsumexp(log_p + torch.log(probs), -1)
    return float((margin > 0).float().mean()), float(nll.mean())


def test_latent_mixture_recovers_the_groups_and_beats_one_gating(pairs):
    (train, _), (val, _), (test, group) = pairs
    net, report = fit_latent(train, val, D, MixtureTrainConfig(groups=[1, 2, 3], restarts=1), progress=False)
    assert report["groups"] == 2, report["candidates"]
    gate, _ = train_gating(train, val, D, Stage2Config(), progress=False)
    x = torch.tensor(test.gating_emb)
    with torch.no_grad():
        probs, gating = net(x)
        single = gate(x)
    assert adjusted_rand_score(group, probs.argmax(-1).numpy()) >= 0.8
    # The groups' weightings are the true ones, in some order.
    learned = gating[0].numpy()
    order = [int(np.abs(learned - w).sum(1).argmin()) for w in WEIGHTS]
    assert sorted(order) == [0, 1]
    assert np.abs(learned[order] - WEIGHTS).max() < 0.6
    # Held out: a higher likelihood than one gating (BT on its margin) and at least its accuracy.
    acc, nll = held_out(probs, gating, test)
    single_acc, single_nll = held_out(torch.ones(len(x), 1), single[:, None, :], test)
    assert nll < single_nll - 0.03
    assert acc >= single_acc
    # mixture_nll is the likelihood written out above, weighted.
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    with torch.no_grad():
        assert float(mixture_nll(net, x, as_t(test.delta), as_t(test.weight))) == pytest.approx(nll, rel=1e-5)


def test_one_standard_error_takes_the_smallest_m_within_one_error_of_the_best():
    rng = np.random.default_rng(1)
    best = rng.normal(1.0, 0.3, 400)
    noise = rng.normal(0, 0.05, 400)
    noise -= noise.mean()
    se = noise.std(ddof=1) / np.sqrt(400)  # of the per-pair differences from the best
    weight = np.ones(400)
    assert one_standard_error({2: best + noise + 0.5 * se, 3: best}, weight) == 2
    assert one_standard_error({2: best + noise + 2 * se, 3: best}, weight) == 3
    assert one_standard_error({1: best + 0.2, 2: best + noise + 0.5 * se, 3: best}, weight) == 2
    # Weight-0 pairs (ties) count for nothing.
    assert one_standard_error({1: np.r_[best, [1e6]], 2: np.r_[best + 0.2, [0.0]]}, np.r_[weight, 0]) == 1


def test_category_router_sends_each_prompt_to_its_category_gating(pairs):
    (train, tg), (val, vg), (test, group) = pairs
    cfg = MixtureTrainConfig(routing="category", component_n_hidden=0)
    net, report = fit_routed(train, val, tg, vg, ["a", "b"], D, cfg)
    assert report["router_val_accuracy"] > 0.98
    with torch.no_grad():
        probs, gating = net(torch.tensor(test.gating_emb))
    assert (probs.argmax(-1).numpy() == group).mean() > 0.98
    acc, _ = held_out(probs, gating, test)
    bayes = float((((WEIGHTS[group] * test.delta).sum(1)) > 0).mean())
    assert acc > bayes - 0.02


def test_categories_and_category_labels():
    assert category_of("rmb", "Harmlessness/Violent/Weapons", 1) == "rmb/Harmlessness"
    assert category_of("hh", None, 2) == "hh"
    assert categories(["a"] * 5 + ["b"] * 3 + ["c"], min_pairs=3) == ["a", "b", "other"]
    assert categories(["a"] * 5, min_pairs=3) == ["a"]


def test_pair_nll_is_minus_the_log_of_the_mixture_probability(pairs):
    (train, _), _, _ = pairs
    from polyreward.models.torch.heads import Mixture

    net = Mixture(D, 4, MixtureTrainConfig().mixture_config(["a", "b"], "fixed"))
    with torch.no_grad():
        net.group_logits.normal_()
        x, delta = torch.tensor(train.gating_emb[:50]), torch.tensor(train.delta[:50], dtype=torch.float32)
        probs, gating = net(x)
        direct = -torch.log((probs * torch.sigmoid((gating * delta[:, None, :]).sum(-1))).sum(-1))
        assert torch.allclose(pair_nll(net, x, delta), direct, atol=1e-5)
