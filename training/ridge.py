"""Stage 1 regression: one ridge regression per objective on absolute ratings, labels may be missing."""

from __future__ import annotations

import numpy as np


def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Fit `y[:, k] ≈ x @ w_k + b_k` for each objective k on the rows where y[:, k] is not NaN.

    The intercept is not penalised. Returns (weights [K, D], bias [K]) as float32.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    if y.ndim != 2 or y.shape[0] != x.shape[0]:
        raise ValueError(f"labels have shape {y.shape}, expected ({x.shape[0]}, K)")
    weights = np.zeros((y.shape[1], x.shape[1]))
    bias = np.zeros(y.shape[1])
    for k in range(y.shape[1]):
        rows = ~np.isnan(y[:, k])
        if rows.sum() < 2:
            raise ValueError(f"objective {k}: needs at least 2 labelled rows, has {int(rows.sum())}")
        xk, yk = x[rows], y[rows, k]
        x_mean, y_mean = xk.mean(0), yk.mean()
        xc = xk - x_mean
        weights[k] = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (yk - y_mean))
        bias[k] = y_mean - x_mean @ weights[k]
    return weights.astype(np.float32), bias.astype(np.float32)
