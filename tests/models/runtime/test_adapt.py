"""Few-shot adaptation's maths against direct computations (`polyreward.models.runtime.adapt`)."""

from __future__ import annotations

import numpy as np
import pytest

from polyreward.models.runtime.adapt import over_groups, over_objectives

rng = np.random.default_rng(0)


def test_over_groups_is_the_router_tilted_by_the_evidence():
    margins, probs = rng.normal(0, 2, (20, 3)), rng.dirichlet(np.ones(3), 20)
    fit = over_groups(margins, probs)
    log_w = np.log(1 / (1 + np.exp(-margins))).sum(0)
    assert np.allclose(fit.weights, np.exp(log_w) / np.exp(log_w).sum())
    tilted = probs * fit.weights / (probs * fit.weights).sum(1, keepdims=True)
    assert np.allclose(fit.margins, (tilted * margins).sum(1))
    assert fit.prior_log_likelihood == pytest.approx(
        np.log(1 / (1 + np.exp(-(probs * margins).sum(1)))).sum()
    )
    # No evidence (all groups equally likely): the population itself.
    assert np.allclose(over_groups(np.zeros((5, 3)), probs[:5]).weights, 1 / 3)


def test_over_objectives_is_the_map_offset_and_shrinks_to_the_population():
    delta, m = rng.normal(size=(40, 4)), rng.normal(size=40)
    fit = over_objectives(delta, m, strength=2.0)
    grad = -(delta / (1 + np.exp(m + delta @ fit.weights))[:, None]).sum(0) + 2.0 * fit.weights
    assert np.abs(grad).max() < 1e-8
    assert np.allclose(fit.margins, m + delta @ fit.weights)
    assert fit.log_likelihood > fit.prior_log_likelihood
    strong = over_objectives(delta, m, strength=1e6)
    assert np.abs(strong.weights).max() < 1e-4 and np.allclose(strong.margins, m, atol=1e-3)
    # A denormal λ with fewer pairs than objectives: a singular Hessian, still a finite answer.
    assert np.isfinite(over_objectives(delta[:2], m[:2], strength=5e-324).weights).all()
    with pytest.raises(ValueError, match="strength"):
        over_objectives(delta, m, strength=0.0)
