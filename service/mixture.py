"""Recipes on mixture models' groups (`polyreward.service.postprocess`, aggregates 'groups' and 'worst_group')."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from polyreward.models.runtime.scorer import ScoreResult
from polyreward.service.recipe import RecipeError, RecipeSpec


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
    if spec.group_weights is not None:
        unknown = sorted(set(spec.group_weights) - set(groups))
        if unknown:
            raise RecipeError(
                f"group_weights: unknown groups {unknown}; known: {list(groups)}", "unknown_group"
            )


def group_aggregate(
    aggregate: str,
    weights: np.ndarray | None,
    y: np.ndarray,
    results: Sequence[ScoreResult],
    transformed: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(the groups' aggregate [N], its weights on y [N, K]): Σ_m w_m s_m ('groups') or min_m s_m
    ('worst_group'), with s the graph's group scores, or Σ_k G_mk y_k where a transform changed y."""
    g = np.array([r.group_gating for r in results], np.float64)  # [N, M, K learned]
    g = np.concatenate([g, np.zeros((*g.shape[:2], y.shape[1] - g.shape[2]))], -1)  # rule objectives weigh 0
    scores = (
        (g * y[:, None, :]).sum(-1)
        if transformed
        else np.array([r.group_scores for r in results], np.float64)
    )
    if aggregate == "groups":
        return scores @ weights, np.einsum("m,nmk->nk", weights, g)
    rows, worst = np.arange(len(y)), scores.argmin(-1)
    return scores[rows, worst], g[rows, worst]
