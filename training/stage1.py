"""Stage 1: one linear reward head per objective, fitted in closed form on frozen embeddings.

* Rated objectives: ridge regression on the rows that have a label (NaN = missing), the regularization
  chosen per objective on a validation split from a grid scaled to the data's mean eigenvalue.
* Objectives that only exist as labelled preference pairs (rmb's helpfulness / harmlessness goals, HH):
  a Bradley–Terry linear head, i.e. L2-regularized logistic regression on embedding differences (Newton).
* Verbosity: ridge regression onto log(1 + words in the response), the axis stage 2 debiases against.

Each fit also returns its posterior in low-rank form so the graph can output the posterior standard deviation
of every objective's reward (see `models.heads`): ridge `var = s2 z'A^-1 z` with `A = Xc'Xc + alpha I` and s2
the residual variance; Bradley–Terry the Laplace approximation `var = z'A^-1 z`, `A = D' diag(p(1-p)) D + lambda I`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import spearmanr

# Regularization grid, as multiples of the mean eigenvalue of the (centered) Gram matrix.
ALPHA_GRID = tuple(float(a) for a in np.logspace(-4, 1, 11))


@dataclass
class ObjectiveFit:
    """A fitted linear head `reward = w . x + b` with its posterior factors."""

    weight: np.ndarray  # [D]
    bias: float
    mean: np.ndarray  # [D] center of the training embeddings
    basis: np.ndarray  # [r, D] eigenvectors scaled by sqrt(s / (s + alpha))
    alpha: float  # absolute regularization (prior precision)
    scale: float  # multiplier of z'A^-1 z: the label noise variance (ridge) or 1 (Bradley–Terry)
    metrics: dict = field(default_factory=dict)
    residual: float = 0.0  # label noise variance s² the predictive σ adds (ridge; 0 for Bradley–Terry)
    conformal_scores: np.ndarray | None = None  # |y − ŷ| / σp on held-out rows (`with_conformal_scores`)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight + self.bias

    def epistemic_std(self, x: np.ndarray) -> np.ndarray:
        """The graph's uncertainty output for these (already normalized) embeddings."""
        z = x - self.mean
        quad = ((z * z).sum(-1) - ((z @ self.basis.T) ** 2).sum(-1)) / self.alpha
        return np.sqrt(self.scale * np.clip(quad, 0, None))

    def predictive_std(self, x: np.ndarray) -> np.ndarray:
        return np.sqrt(self.epistemic_std(x) ** 2 + self.residual)


def _posterior_basis(gram: np.ndarray, alpha: float, rank: int) -> np.ndarray:
    s, v = np.linalg.eigh(gram)
    top = np.argsort(s)[::-1][:rank]
    s, v = np.clip(s[top], 0, None), v[:, top]
    return (v * np.sqrt(s / (s + alpha))).T


def fit_ridge_cv(
    x: np.ndarray,
    y: np.ndarray,
    val: np.ndarray,
    *,
    rank: int = 64,
    grid: Sequence[float] = ALPHA_GRID,
) -> ObjectiveFit:
    """Ridge on rows with a label; alpha picked by validation MSE, then refit on all labelled rows."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rows = ~np.isnan(y)
    train, held = rows & ~val, rows & val
    if train.sum() < 2:
        raise ValueError(f"needs at least 2 labelled training rows, has {int(train.sum())}")
    mu = x[train].mean(0)
    xc = x[train] - mu
    s, v = np.linalg.eigh(xc.T @ xc)
    proj = v.T @ (xc.T @ (y[train] - y[train].mean()))
    unit = max(float(s.mean()), 1e-12)
    best = (np.inf, grid[0] * unit)
    if held.sum() >= 2:
        for c in grid:
            w = v @ (proj / (s + c * unit))
            pred = (x[held] - mu) @ w + y[train].mean()
            best = min(best, (float(np.mean((pred - y[held]) ** 2)), c * unit))
    else:
        best = (np.nan, 1.0 * unit)
    alpha = best[1]
    mu = x[rows].mean(0)
    xc = x[rows] - mu
    gram = xc.T @ xc
    w = np.linalg.solve(gram + alpha * np.eye(len(mu)), xc.T @ (y[rows] - y[rows].mean()))
    b = float(y[rows].mean() - mu @ w)
    resid = xc @ w + y[rows].mean() - y[rows]
    noise = float(np.mean(resid**2))
    metrics = {"n": int(rows.sum()), "n_val": int(held.sum()), "alpha": alpha, "val_mse": best[0]}
    fit = ObjectiveFit(
        weight=w, bias=b, mean=mu, basis=_posterior_basis(gram, alpha, rank),
        alpha=alpha, scale=noise, metrics=metrics, residual=noise,
    )  # fmt: skip
    if held.sum() >= 3:
        # Validation metrics are from the model fitted without those rows (refit on train only).
        w_t = v @ (proj / (s + alpha))
        pred = (x[held] - x[train].mean(0)) @ w_t + y[train].mean()
        metrics["val_spearman"] = float(spearmanr(pred, y[held]).statistic)
    return fit


def with_conformal_scores(fit: ObjectiveFit, x: np.ndarray, y: np.ndarray, held: np.ndarray) -> ObjectiveFit:
    """Split-conformal scores |y − ŷ| / σp on the labelled `held` rows, ŷ from a ridge with the fit's alpha
    fitted on the other labelled rows. `held` should hold whole prompts out (a new prompt's responses are
    what the intervals are for; rows of a prompt seen in training are closer than that)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    rows = ~np.isnan(y)
    train, held = rows & ~held, rows & held
    if held.sum() >= 2 and train.sum() >= 2:
        mu, mean_y = x[train].mean(0), y[train].mean()
        xc = x[train] - mu
        w = np.linalg.solve(xc.T @ xc + fit.alpha * np.eye(len(mu)), xc.T @ (y[train] - mean_y))
        pred = (x[held] - mu) @ w + mean_y
        fit.conformal_scores = np.abs(y[held] - pred) / fit.predictive_std(x[held])
    return fit


def _logistic_newton(d: np.ndarray, weight: np.ndarray, lam: float, iters: int = 30) -> np.ndarray:
    """argmin_w sum_i weight_i log(1 + exp(-d_i . w)) + lam/2 |w|^2 (no intercept: a pair has no side)."""
    w = np.zeros(d.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-(d @ w)))
        grad = d.T @ (weight * (p - 1)) + lam * w
        hess = (d * (weight * p * (1 - p))[:, None]).T @ d + lam * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-7:
            break
    return w


def _log_loss(d: np.ndarray, w: np.ndarray) -> float:
    return float(np.mean(np.logaddexp(0, -(d @ w))))


def fit_bradley_terry(
    chosen: np.ndarray,
    rejected: np.ndarray,
    val: np.ndarray,
    *,
    rank: int = 64,
    grid: Sequence[float] = ALPHA_GRID,
    weight: np.ndarray | None = None,
) -> ObjectiveFit:
    """Linear Bradley–Terry head on pairs: P(chosen ≻ rejected) = sigmoid(w . (x_c - x_r)).

    lambda is picked by validation log-loss, then the head is refit on all pairs. The bias centers the
    reward on the pairs' responses (Bradley–Terry only fixes differences).
    """
    xc, xr = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    d = xc - xr
    weight = np.ones(len(d)) if weight is None else np.asarray(weight, np.float64)
    train = ~val
    if train.sum() < 2:
        raise ValueError(f"needs at least 2 training pairs, has {int(train.sum())}")
    unit = max(float(np.trace(d[train].T @ d[train])) / d.shape[1], 1e-12)
    best = (np.inf, 1e-2 * unit)
    if val.sum() >= 2:
        for c in grid:
            w = _logistic_newton(d[train], weight[train], c * unit)
            best = min(best, (_log_loss(d[val], w), c * unit))
    lam = best[1]
    metrics: dict = {"n": len(d), "n_val": int(val.sum()), "alpha": lam, "val_log_loss": best[0]}
    if val.sum() >= 2:
        w_t = _logistic_newton(d[train], weight[train], lam)
        metrics["val_accuracy"] = float(np.mean(d[val] @ w_t > 0))
    w = _logistic_newton(d, weight, lam)
    p = 1 / (1 + np.exp(-(d @ w)))
    gram = (d * (weight * p * (1 - p))[:, None]).T @ d
    mu = np.concatenate([xc, xr]).mean(0)
    return ObjectiveFit(
        weight=w, bias=float(-mu @ w), mean=mu, basis=_posterior_basis(gram, lam, rank),
        alpha=lam, scale=1.0, metrics=metrics,
    )  # fmt: skip


def verbosity_target(responses: Sequence[str]) -> np.ndarray:
    """log(1 + words): what the verbosity objective regresses onto."""
    return np.log1p(np.array([len(r.split()) for r in responses], np.float64))


def heads_from_fits(
    objectives, fits: Sequence[ObjectiveFit], hidden: int, rank: int, *, normalize: bool = False
):
    """Fixed-weights `RewardHeads` carrying the fitted regression layer and uncertainty factors.

    normalize: the fits were made on L2-normalized embeddings, so the heads normalize too.
    """
    import torch

    from polyreward.models.torch.heads import HeadsConfig, RewardHeads

    rank = min(rank, *(len(f.basis) for f in fits))
    heads = RewardHeads(
        HeadsConfig(
            objectives=list(objectives),
            hidden_size=hidden,
            kind="fixed",
            uncertainty_rank=rank,
            normalize=normalize,
        )
    )
    stack = lambda xs: torch.tensor(np.stack(xs), dtype=torch.float32)  # noqa: E731
    state = {
        "regression.weight": stack([f.weight for f in fits]),
        "regression.bias": stack([f.bias for f in fits]),
        "uncertainty_mean": stack([f.mean for f in fits]),
        "uncertainty_basis": stack([f.basis[:rank] for f in fits]),
        "uncertainty_inv_alpha": stack([1 / f.alpha for f in fits]),
        "uncertainty_scale": stack([f.scale for f in fits]),
    }
    heads.load_state_dict({**heads.state_dict(), **state})
    return heads.eval()
