"""Stage 1 and stage 2 maths on synthetic embeddings with known answers (no backbone needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from polyreward.models.runtime.objectives import Objective
from polyreward.training.stage1 import fit_bradley_terry, fit_ridge_cv, heads_from_fits
from polyreward.training.stage2 import PairTensors, Stage2Config, debias_transform, train_gating

rng = np.random.default_rng(0)


def test_ridge_recovers_a_linear_target_with_missing_labels_and_picks_alpha_on_validation():
    x = rng.normal(size=(600, 20))
    w = rng.normal(size=20)
    y = x @ w + 3 + 0.1 * rng.normal(size=600)
    y[::7] = np.nan  # missing labels are masked, not zeros
    val = rng.random(600) < 0.2
    fit = fit_ridge_cv(x, y, val, rank=20)
    assert np.allclose(fit.weight, w, atol=0.05)
    assert fit.metrics["val_spearman"] > 0.99
    assert fit.metrics["n"] == int((~np.isnan(y)).sum())
    # A pure-noise target gets strong regularization (weights shrink towards zero).
    noise = fit_ridge_cv(x, rng.normal(size=600), val, rank=20)
    assert np.abs(noise.weight).max() < 0.1 * np.abs(fit.weight).max()


def test_ridge_uncertainty_is_the_exact_posterior_std_at_full_rank():
    x = rng.normal(size=(200, 8)) * np.arange(1, 9)
    y = x @ rng.normal(size=8) + rng.normal(size=200)
    fit = fit_ridge_cv(x, y, np.zeros(200, bool), rank=8)
    heads = heads_from_fits([Objective(name="a")], [fit], hidden=8, rank=8)
    probe = rng.normal(size=(5, 8)) * 10
    got = heads.uncertainty(torch.tensor(probe, dtype=torch.float32)).numpy()[:, 0]
    xc = x - x.mean(0)
    a_inv = np.linalg.inv(xc.T @ xc + fit.alpha * np.eye(8))
    z = probe - x.mean(0)
    want = np.sqrt(fit.scale * np.einsum("nd,de,ne->n", z, a_inv, z))
    assert np.allclose(got, want, rtol=1e-4)
    # Far from the data, the uncertainty grows.
    assert got.mean() > heads.uncertainty(torch.tensor(x[:5], dtype=torch.float32)).mean().item()


def test_low_rank_uncertainty_is_conservative():
    x = rng.normal(size=(300, 16)) * np.linspace(0.1, 3, 16)
    y = x[:, 0] + rng.normal(size=300)
    full = heads_from_fits([Objective(name="a")], [fit_ridge_cv(x, y, np.zeros(300, bool), rank=16)], 16, 16)
    low = heads_from_fits([Objective(name="a")], [fit_ridge_cv(x, y, np.zeros(300, bool), rank=4)], 16, 4)
    probe = torch.tensor(rng.normal(size=(50, 16)), dtype=torch.float32)
    assert (low.uncertainty(probe) >= full.uncertainty(probe) - 1e-5).all()


def test_bradley_terry_head_learns_the_preference_direction():
    direction = rng.normal(size=12)
    xc, xr = rng.normal(size=(800, 12)), rng.normal(size=(800, 12))
    swap = (xc - xr) @ direction < 0  # make "chosen" the one further along the direction
    xc[swap], xr[swap] = xr[swap].copy(), xc[swap].copy()
    val = rng.random(800) < 0.2
    fit = fit_bradley_terry(xc, xr, val, rank=12)
    cos = fit.weight @ direction / np.linalg.norm(fit.weight) / np.linalg.norm(direction)
    assert cos > 0.95
    assert fit.metrics["val_accuracy"] > 0.9
    assert abs(fit.predict(np.concatenate([xc, xr])).mean()) < 1e-6  # centered on the pairs' responses


def test_debias_transform_brings_every_objective_below_the_threshold_and_unit_scale():
    length = rng.normal(size=2000)
    quality = rng.normal(size=2000)
    rewards = np.stack([quality + 0.8 * length, -0.5 * length + quality, length], 1)
    t, lambdas = debias_transform(rewards, verbosity=2, threshold=0.03)
    after = rewards @ t
    for k in (0, 1):
        assert abs(spearmanr(rewards[:, k], length).statistic) > 0.3
        assert abs(spearmanr(after[:, k], rewards[:, 2]).statistic) < 0.03
    assert lambdas[0] > 0 > lambdas[1]
    assert np.allclose(after.std(0), 1.0)


def test_gating_learns_which_objective_matters_for_which_prompt():
    """Two prompt clusters, each judged by a different objective: gating must route them, early stopping on."""
    n, d = 3000, 8
    cluster = rng.integers(0, 2, n)
    g = rng.normal(size=(n, d)) + 3 * cluster[:, None] * np.eye(d)[0]
    delta = rng.normal(size=(n, 2))
    # The preference follows objective 0 in cluster 0 and objective 1 in cluster 1; flip delta to match.
    follows = np.where(cluster == 0, delta[:, 0], delta[:, 1])
    delta[follows < 0] *= -1
    pairs = PairTensors(delta, g, np.ones(n))
    val = slice(2500, None)
    net, report = train_gating(
        PairTensors(delta[:2500], g[:2500], np.ones(2500)),
        PairTensors(delta[val], g[val], np.ones(500)),
        d,
        Stage2Config(hidden_dim=32, max_epochs=80, patience=10, temperature=1.0, lr=1e-2),
        progress=False,
    )
    with torch.no_grad():
        gates = net(torch.tensor(pairs.gating_emb, dtype=torch.float32)).numpy()
    assert gates[cluster == 0, 0].mean() > gates[cluster == 0, 1].mean() * 2
    assert gates[cluster == 1, 1].mean() > gates[cluster == 1, 0].mean() * 2
    assert report["val_accuracy"] > 0.9
    assert report["best_epoch"] <= report["epochs"]


@pytest.mark.parametrize("bad", [{"threshold": 0}, {"patience": 0}, {"tie_weight": 2}])
def test_stage2_config_names_the_bad_field(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        Stage2Config(**bad)


def test_normalized_heads_score_like_a_fit_on_normalized_embeddings():
    x = rng.normal(size=(300, 6)) * rng.uniform(0.5, 3, size=(300, 1))  # varying norms
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    fit = fit_ridge_cv(unit, unit[:, 0] * 2 + 1, np.zeros(300, bool), rank=6)
    heads = heads_from_fits([Objective(name="a")], [fit], hidden=6, rank=6, normalize=True)
    rewards, _, _, unc = heads(torch.tensor(x * 7, dtype=torch.float32))  # the norm must not matter
    assert np.allclose(rewards.detach().numpy()[:, 0], fit.predict(unit), atol=1e-4)
    assert unc.shape == (300, 1)
