"""Few-shot adaptation to one user from k labelled pairs (README, "Few-shot users"; `POST /v1/adapt`). No torch.

Each pair i gives the difference of the debiased objectives Δ_i = (r_c − r_r) @ T [K] and, for a mixture
model, each group's score margin Δs_im = G_m(x_i) · Δ_i [M]. Two ways to adapt, each regularized toward the
population the model was trained on:

* **over groups** (mixture models): the user is one of the M groups, with the router's mean probability over
  the pairs' prompts as the prior, π̄ = mean_i π(x_i). The posterior after the pairs is exact:

      p_m ∝ π̄_m · Π_i σ(Δs_im),   i.e.   log p_m = log π̄_m + Σ_i log σ(Δs_im) − logZ

  and the user's reward is Σ_m p_m s_m (aggregate 'groups' with these group_weights).
* **over objectives** (any model): one fixed weighting w [K], the maximum a posteriori of Bradley–Terry with
  a Gaussian prior centred on the population's weights w̄ = mean_i g(x_i) (the model's gating on the pairs'
  prompts):

      w = argmin_w  Σ_i log(1 + exp(−w · Δ_i)) + (λ / 2) ‖w − w̄‖²

  solved by Newton's method (the objective is strictly convex for λ > 0); the user's reward is Σ_k w_k x_k
  (aggregate 'sum' with these weights). λ (`strength`) counts like pseudo-pairs: small λ trusts the k pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_STRENGTH = 1.0  # λ of `over_objectives`
NEWTON_STEPS = 50
TOLERANCE = 1e-10


def _log_sigmoid(z: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -z)


@dataclass(frozen=True)
class Adapted:
    weights: np.ndarray  # [K] over objectives, or [M] over groups
    log_likelihood: float  # Σ_i log P(chosen_i ≻ rejected_i) under the adapted weights
    prior_log_likelihood: float  # the same under the population's


def over_groups(group_margins: np.ndarray, prior: np.ndarray) -> Adapted:
    """The posterior over groups: `group_margins` [P, M] = Δs_im, `prior` [M] = π̄ (positive, sums to 1)."""
    group_margins, prior = np.asarray(group_margins, np.float64), np.asarray(prior, np.float64)
    evidence = _log_sigmoid(group_margins).sum(0)  # [M]: Σ_i log σ(Δs_im)
    log_post = np.log(np.clip(prior, 1e-300, None)) + evidence
    post = np.exp(log_post - log_post.max())
    post /= post.sum()

    def loglik(p: np.ndarray) -> float:  # of the served score Σ_m p_m s_m: the margin is p · Δs
        return float(_log_sigmoid(group_margins @ p).sum())

    return Adapted(post, loglik(post), loglik(prior))


def over_objectives(delta: np.ndarray, prior_weights: np.ndarray, strength: float) -> Adapted:
    """MAP weights: `delta` [P, K] = Δ_i, `prior_weights` [K] = w̄, `strength` λ > 0."""
    if not strength > 0:
        raise ValueError("strength must be positive")
    delta, w0 = np.asarray(delta, np.float64), np.asarray(prior_weights, np.float64)

    def loss(w: np.ndarray) -> float:
        return float(-_log_sigmoid(delta @ w).sum() + strength / 2 * ((w - w0) ** 2).sum())

    w = w0.copy()
    eye = np.eye(len(w0))
    for _ in range(NEWTON_STEPS):
        p = np.exp(_log_sigmoid(-(delta @ w)))  # σ(−z): the gradient's weight per pair
        grad = -(delta * p[:, None]).sum(0) + strength * (w - w0)
        hess = (delta * (p * (1 - p))[:, None]).T @ delta + strength * eye
        step = np.linalg.solve(hess, grad)
        t, before = 1.0, loss(w)
        while loss(w - t * step) > before and t > 1e-6:  # backtracking: Newton's full step may overshoot
            t /= 2
        w = w - t * step
        if float(step @ step) * t * t < TOLERANCE:
            break
    return Adapted(w, float(_log_sigmoid(delta @ w).sum()), float(_log_sigmoid(delta @ w0).sum()))
