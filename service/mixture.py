"""Recipes on mixture models' groups (`polyreward.service.postprocess`, aggregates 'groups' and 'worst_group')."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from polyreward.models.runtime.scorer import ScoreResult
from polyreward.service.recipe import RecipeError, RecipeSpec

if TYPE_CHECKING:
    from polyreward.service.postprocess import Recipe


def check_groups(spec: RecipeSpec, aggregate: str, groups: tuple[str, ...], model: str) -> None:
    """A recipe that reads groups needs a model with them, group_weights go with aggregate 'groups' (and
    objective weights not), and they name the model's groups."""
    if spec.group_weights is not None and not groups:
        raise RecipeError(f"group_weights: model {model!r} has no groups (not a mixture model)", "no_groups")
    if aggregate in ("groups", "worst_group") and not groups:
        raise RecipeError(
            f"aggregate: model {model!r} has no groups ({aggregate!r} needs a mixture model)", "no_groups"
        )
    if aggregate in ("groups", "worst_group") and spec.weights is not None:
        raise RecipeError(
            f"weights: aggregate {aggregate!r} mixes the model's groups; leave weights out",
            "conflicting_options",
        )
    if (aggregate == "groups") != (spec.group_weights is not None):
        raise RecipeError(
            "group_weights: give them exactly when aggregate is 'groups'", "conflicting_options"
        )
    if spec.gating_offset is not None and aggregate != "gating":
        raise RecipeError(
            f"gating_offset: it shifts the model's gating, so aggregate must be 'gating', not {aggregate!r}",
            "conflicting_options",
        )
    if spec.group_weights is not None and not any(spec.group_weights.values()):
        raise RecipeError("group_weights: at least one group needs a positive weight", "needs_weights")
    if spec.group_weights is not None:
        unknown = sorted(set(spec.group_weights) - set(groups))
        if unknown:
            raise RecipeError(
                f"group_weights: unknown groups {unknown}; known: {list(groups)}", "unknown_group"
            )


def group_stats(calibration: dict | None, groups: tuple[str, ...]) -> np.ndarray:
    """[M, 2]: each group score's mean and std on the training responses (the manifest's), else 0 and 1."""
    return np.array(
        [[calibration[g].mean, calibration[g].std] if calibration else [0.0, 1.0] for g in groups]
    )


def group_aggregate(
    recipe: Recipe, y: np.ndarray, results: Sequence[ScoreResult]
) -> tuple[np.ndarray, np.ndarray]:
    """(the groups' aggregate [N], its weights on y [N, K]): Σ_m π'_m s_m with π'_m ∝ π_m w_m ('groups') or
    min_m (s_m − μ_m) / σ_m ('worst_group', μ and σ the manifest's group stats, else 0 and 1), with s the graph's
    group scores, or Σ_k G_mk y_k where a transform changed y."""
    g = np.array([r.group_gating for r in results], np.float64)  # [N, M, K learned]
    g = np.concatenate([g, np.zeros((*g.shape[:2], y.shape[1] - g.shape[2]))], -1)  # rule objectives weigh 0
    scores = (
        (g * y[:, None, :]).sum(-1)
        if recipe.spec.transform is not None
        else np.array([r.group_scores for r in results], np.float64)
    )
    if recipe.aggregate == "groups":  # the router reweighted: π'_m ∝ π_m w_m (π floored, so no row sums to 0)
        tilted = np.array([r.group_probs for r in results], np.float64).clip(1e-12) * recipe.group_weights
        tilted /= tilted.sum(-1, keepdims=True)
        return (tilted * scores).sum(-1), np.einsum("nm,nmk->nk", tilted, g)
    mean, std = recipe.group_stats.T
    z = (scores - mean) / std  # the groups' scores in comparable units
    rows, worst = np.arange(len(y)), z.argmin(-1)
    return z[rows, worst], g[rows, worst] / std[worst, None]
