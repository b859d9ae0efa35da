"""Reward recipes (service/postprocess.py) against direct computations of the README's formulas, uncertainty
propagation against Monte Carlo, and split-conformal coverage on a held-out split."""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyreward.models.default import DEFAULT_MODEL
from polyreward.models.runtime.manifest import CalibrationStat, Manifest, ObjectiveUncertainty
from polyreward.models.runtime.scorer import ScoreResult
from polyreward.models.runtime.uncertainty import conformal_multipliers, normal_quantile
from polyreward.service.postprocess import Recipe, margin_probability, sigmoid
from polyreward.service.recipe import RecipeError, RecipeSpec
from polyreward.training.stage1 import fit_ridge_cv, with_conformal_scores

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    """The shipped manifest with known synthetic T, stats and residual variances (K = 11 objectives)."""
    shipped = Manifest.model_validate_json((DEFAULT_MODEL / "manifest.json").read_text())
    names = shipped.objective_names
    k = len(names)
    t = np.eye(k) * RNG.uniform(0.5, 3, k)
    t[-1, :-1] = RNG.normal(0, 0.5, k - 1)  # the verbosity row, as the debiasing writes it
    stats = lambda: {n: CalibrationStat(mean=RNG.normal(), std=RNG.uniform(0.5, 2)) for n in names}  # noqa: E731
    return shipped.model_copy(
        update={
            "transform": t.tolist(),
            "calibration": stats(),
            "debiased_calibration": stats(),
            "uncertainty": {n: ObjectiveUncertainty(residual_variance=RNG.uniform(0, 0.05)) for n in names},
        }
    )


def results(manifest, n=4, sigma=0.2):
    k = len(manifest.objective_names)
    t = np.array(manifest.transform)
    out = []
    for _ in range(n):
        r, g = RNG.normal(0, 1, k), RNG.dirichlet(np.ones(k))
        out.append(ScoreResult(float(g @ (r @ t)), r.tolist(), g.tolist(), 9, False, [sigma] * k))
    return out


def arrays(manifest, res):
    raw = np.array([r.rewards for r in res])
    t = np.array(manifest.transform)
    names = manifest.objective_names
    mean = np.array([manifest.debiased_calibration[n].mean for n in names])
    std = np.array([manifest.debiased_calibration[n].std for n in names])
    return raw, t, mean, std


def test_weighted_scores_follow_the_formula_in_both_spaces(manifest):
    res = results(manifest)
    raw, t, mean, std = arrays(manifest, res)
    names = manifest.objective_names
    w = {names[1]: 2.0, names[3]: -0.5}
    wv = np.array([w.get(n, 0.0) for n in names])
    rows = Recipe.build(manifest).apply(res)  # the default: the model's own score, debiased objectives
    assert [r["score"] for r in rows] == [r.score for r in res]
    assert np.allclose([r["rewards"] for r in rows], raw @ t)
    assert [r["raw"]["rewards"] for r in rows] == [r.rewards for r in res]
    debiased = [r["score"] for r in Recipe.build(manifest, weights=w).apply(res)]
    assert np.allclose(debiased, (raw @ t) @ wv)
    plain = [r["score"] for r in Recipe.build(manifest, weights=w, space="raw").apply(res)]
    assert np.allclose(plain, raw @ wv)
    z = [r["score"] for r in Recipe.build(manifest, weights=w, normalize=True).apply(res)]
    assert np.allclose(z, ((raw @ t - mean) / std) @ wv)
    raw_mean = np.array([manifest.calibration[n].mean for n in names])
    raw_std = np.array([manifest.calibration[n].std for n in names])
    zr = Recipe.build(manifest, weights=w, normalize=True, space="raw").apply(res)
    assert np.allclose([r["rewards"] for r in zr], (raw - raw_mean) / raw_std)


def test_transforms_aggregates_constraints_and_groups_match_direct_computation(manifest):
    res = results(manifest, n=5)
    raw, t, _, _ = arrays(manifest, res)
    x = raw @ t
    names = manifest.objective_names
    a, b = names[0], names[5]
    w = np.zeros(len(names))
    w[[0, 5]] = [1.0, 2.0]
    groups = ["p", "p", "p", "q", "q"]
    log_sig = lambda v: np.log(1 / (1 + np.exp(-v)))  # noqa: E731
    # fixed reference, logical AND
    ref = np.zeros(len(names))
    ref[[0, 5]] = [0.3, -0.2]
    spec = RecipeSpec(weights={a: 1.0, b: 2.0}, aggregate="and", transform={"reference": {a: 0.3, b: -0.2}})
    rows = Recipe.build(manifest, spec).apply(res)
    assert np.allclose([r["score"] for r in rows], log_sig(x - ref) @ w)
    assert np.allclose([r["transformed"] for r in rows], log_sig(x - ref))
    # the group's other items as the reference, worst objective
    loo = np.array([x[[j for j in range(5) if groups[j] == groups[i] and j != i]].mean(0) for i in range(5)])
    spec = RecipeSpec(weights={a: 1.0, b: 2.0}, aggregate="min", transform={"reference": "group"})
    rows = Recipe.build(manifest, spec).apply(res, groups)
    assert np.allclose(
        [r["score"] for r in rows], np.minimum(log_sig(x - loo)[:, 0], 2 * log_sig(x - loo)[:, 5])
    )
    # reference responses
    refs = {"p": results(manifest, 2), "q": results(manifest, 1)}
    mean_ref = {g: (np.array([r.rewards for r in v]) @ t).mean(0) for g, v in refs.items()}
    spec = RecipeSpec(weights={a: 1.0}, transform={"reference": "references"})
    rows = Recipe.build(manifest, spec).apply(res, groups, refs)
    want = [log_sig(x[i] - mean_ref[g])[0] for i, g in enumerate(groups)]
    assert np.allclose([r["score"] for r in rows], want)
    # constraints and pessimism on the gated score; its interval is around the gated score itself
    spec = RecipeSpec(constraints={"min": {b: 0.5}, "penalty": 3.0}, pessimism={"kappa": 2.0})
    rows = Recipe.build(manifest, spec).apply(res, extras=["uncertainty", "intervals"])
    for r, row, xi in zip(res, rows, x, strict=True):
        sigma = row["uncertainty"]["score"]["epistemic"]
        assert row["slack"] == pytest.approx({b: xi[5] - 0.5})
        assert row["score"] == pytest.approx(r.score - 2.0 * sigma - 3.0 * max(0.0, 0.5 - xi[5]))
        z, predictive = normal_quantile(0.9), row["uncertainty"]["score"]["predictive"]
        assert row["intervals"]["score"] == pytest.approx(
            [r.score - z * predictive, r.score + z * predictive]
        )
    # group ranks (mid-rank CDF) and z-scores
    rows = Recipe.build(manifest).apply(res, groups, extras=["group_ranks", "group_z"])
    for i, row in enumerate(rows):
        peers = x[[j for j in range(5) if groups[j] == groups[i]]]
        cdf = ((peers < x[i]).sum(0) + (peers == x[i]).sum(0) / 2) / len(peers)
        assert np.allclose(row["group_ranks"], cdf)
        assert np.allclose(row["group_z"], (x[i] - peers.mean(0)) / peers.std(0))


@pytest.mark.parametrize(
    "spec",
    [
        RecipeSpec(),
        RecipeSpec(weights={"helpfulness": 1.0, "safety": -2.0}, normalize=True),
        RecipeSpec(
            weights={"helpfulness": 1.0, "safety": 0.5},
            aggregate="and",
            transform={"reference": {"helpfulness": 1.0, "safety": -1.0}},
        ),
        RecipeSpec(weights={"helpfulness": 1.0, "verbosity": 1.0}, aggregate="min", space="raw"),
    ],
    ids=["gating", "normalized-sum", "and", "min"],
)
def test_uncertainty_propagation_matches_monte_carlo(manifest, spec):
    """Sample raw rewards r ~ N(r̂, diag σp²) and push every sample through the recipe: the standard
    deviations of the objectives and of the score match the propagated ones (delta method where nonlinear)."""
    (item,) = results(manifest, n=1, sigma=0.02)
    recipe = Recipe.build(manifest, spec)
    row = recipe.apply([item], extras=["uncertainty"])[0]
    sigma_p = np.sqrt(0.02**2 + recipe.residual)
    samples = np.array(item.rewards) + RNG.normal(size=(20000, len(item.rewards))) * sigma_p
    drawn = [ScoreResult(float(np.array(item.gating) @ (s @ np.array(manifest.transform))), s.tolist(), item.gating, 9, False, item.uncertainty) for s in samples]  # fmt: skip
    out = recipe.apply(drawn)
    mc_score = np.std([o["score"] for o in out])
    mc_x = np.std([o["rewards"] for o in out], axis=0)
    assert row["uncertainty"]["score"]["predictive"] == pytest.approx(mc_score, rel=0.05)
    assert np.allclose(row["uncertainty"]["predictive"], mc_x, rtol=0.05)


def test_split_conformal_intervals_cover_held_out_ratings_at_their_level(manifest):
    """Heteroscedastic data the ridge head's Gaussian σ gets wrong: fit on the training rows (held-out rows,
    predicted by a head fitted without them, give the conformal scores, as stage 1 does), then coverage of
    new rows is within ±3 points of each level."""
    n, d = 4000, 8
    x = RNG.normal(size=(n, d))
    noise = 0.1 + 0.4 * (x[:, 0] > 0.5)  # a quarter of the rows are four times as noisy
    y = x @ RNG.normal(size=d) + RNG.standard_t(4, size=n) * noise
    train, test = np.arange(n) < 2500, np.arange(n) >= 2500
    val = RNG.random(n) < 0.4
    fit = with_conformal_scores(
        fit_ridge_cv(x[train], y[train], val[train], rank=d), x[train], y[train], val[train]
    )
    name = manifest.objective_names[0]
    info = {name: ObjectiveUncertainty(residual_variance=fit.residual, conformal=conformal_multipliers(fit.conformal_scores), conformal_n=len(fit.conformal_scores))}  # fmt: skip
    m = manifest.model_copy(update={"uncertainty": info})
    k = len(m.objective_names)
    held = [
        ScoreResult(0.0, [float(p)] * k, [1 / k] * k, 1, False, [float(s)] * k)
        for p, s in zip(fit.predict(x[test]), fit.epistemic_std(x[test]), strict=True)
    ]
    recipe = Recipe.build(m, space="raw")
    for level in (0.5, 0.8, 0.9, 0.95):
        rows = recipe.apply(held, extras=["intervals"], level=level)
        bounds = np.array([r["intervals"]["rewards"][0] for r in rows])
        covered = np.mean((bounds[:, 0] <= y[test]) & (y[test] <= bounds[:, 1]))
        assert abs(covered - level) <= 0.03, (level, covered)
    error = np.abs(y[test] - fit.predict(x[test])) / fit.predictive_std(x[test])
    misses = [abs(np.mean(error <= normal_quantile(level)) - level) for level in (0.5, 0.8, 0.9, 0.95)]
    assert max(misses) > 0.03  # what the calibration fixes: plain Gaussian intervals miss some level here


def test_the_probit_margin_and_sigmoid(manifest):
    for x in (-800.0, -30.0, -1.5, 0.0, 2.0, 30.0, 800.0):
        want = 1 / (1 + math.exp(-x)) if x > -700 else 0.0
        assert sigmoid(x) == pytest.approx(want, rel=1e-12, abs=1e-300)
    assert margin_probability(1.2) == pytest.approx(sigmoid(1.2))
    assert margin_probability(1.2, 4.0) == pytest.approx(sigmoid(1.2 / math.sqrt(1 + math.pi * 4.0 / 8)))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"weights": {"nope": 1.0}}, r"weights: unknown objectives \['nope'\]"),
        ({"constraints": {"min": {"nope": 0.0}}}, r"constraints.min: unknown objectives \['nope'\]"),
        (
            {"weights": {"safety": 1.0}, "aggregate": "and"},
            "transform: aggregate 'and' .* needs transform.reference",
        ),
        ({"aggregate": "min"}, "weights: aggregate 'min' needs weights"),
        ({"weights": {"safety": 1.0}, "aggregate": "gating"}, "weights: aggregate 'gating' mixes"),
        (
            {"weights": {"safety": 1.0, "depth": 1.0}, "transform": {"reference": {"safety": 0.0}}},
            r"transform.reference: no value for \['depth'\]",
        ),
    ],
)
def test_a_recipe_the_model_cannot_apply_names_the_field(manifest, fields, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.build(manifest, RecipeSpec(**fields))


def test_artifacts_without_a_transform_serve_the_raw_space(manifest):
    old = manifest.model_copy(update={"transform": None})
    res = results(manifest, 2)
    recipe = Recipe.build(old)
    assert recipe.space == "raw" and [r["score"] for r in recipe.apply(res)] == [r.score for r in res]
    with pytest.raises(RecipeError, match=r"space: model .* records no transform"):
        Recipe.build(old, space="debiased")
    row = recipe.apply(res, extras=["uncertainty"])[0]
    assert row["uncertainty"]["score"] == {"epistemic": None, "predictive": None}  # unknown, not NaN
