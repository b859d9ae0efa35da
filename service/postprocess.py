"""Post-processing: from a model's outputs to the numbers a caller asked for. Torch-free (numpy only).

The service (`/v1/score`, `/v1/compare`, `/get_reward`), `polyreward score` and `polyreward rescore` all go
through here. With K objectives, an item's rewards `r` [K], the calibration stats (mean_k, std_k) of the
artifact's manifest and a caller's weights `w`:

    normalize:  r_k ← (r_k − mean_k) / std_k          (std_k = 0 counts as 1)
    weights:    score = Σ_k w_k r_k                    (after normalize when both are asked; unnamed w_k = 0)
    otherwise:  score = the model's own gated score     (Σ_k gate_k(prompt) (r @ T)_k, computed in the graph)
    pairs:      P(chosen ≻ rejected) = σ(score_c − score_r); per objective σ(r_c,k − r_r,k)

with σ(x) = 1 / (1 + e^−x). Raw values stay available: a recipe never changes a `ScoreResult`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from polyreward.models.runtime.errors import PolyrewardError
from polyreward.models.runtime.manifest import Manifest
from polyreward.models.runtime.scorer import ScoreResult


class RecipeError(PolyrewardError, ValueError):
    """A recipe the model cannot apply; the message names the field, `type` says what is wrong."""

    def __init__(self, message: str, type: str):
        super().__init__(message)
        self.type = type


@dataclass(frozen=True)
class Recipe:
    """What to do with a model's outputs: z-score the rewards (`mean`/`std` given), weigh them (`weights`)."""

    weights: np.ndarray | None = None  # [K], replaces the gating
    mean: np.ndarray | None = None  # [K]
    std: np.ndarray | None = None  # [K]

    @classmethod
    def build(
        cls, manifest: Manifest, weights: Mapping[str, float] | None = None, normalize: bool = False
    ) -> Recipe:
        names = manifest.objective_names
        vector = None
        if weights is not None:
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise RecipeError(
                    f"weights: unknown objectives {unknown}; known: {names}", "unknown_objective"
                )
            vector = np.array([weights.get(n, 0.0) for n in names])
        if not normalize:
            return cls(vector)
        calibration = manifest.calibration or {}
        missing = [n for n in names if n not in calibration]
        if missing:
            raise RecipeError(
                f"normalize: model {manifest.name!r} has no calibration stats for {missing}", "no_calibration"
            )
        mean = np.array([calibration[n].mean for n in names])
        std = np.array([calibration[n].std or 1.0 for n in names])
        return cls(vector, mean, std)

    @property
    def replaces_gating(self) -> bool:
        return self.weights is not None

    def apply(self, result: ScoreResult) -> tuple[float, list[float]]:
        """(score, rewards) of one result under this recipe."""
        rewards = np.array(result.rewards)
        if self.mean is not None:
            rewards = (rewards - self.mean) / self.std
        score = float(rewards @ self.weights) if self.weights is not None else result.score
        return score, rewards.tolist()


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x), without overflow for large |x|."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def pair_probabilities(
    chosen: ScoreResult, rejected: ScoreResult, names: Sequence[str]
) -> tuple[float, dict]:
    """P(chosen ≻ rejected) from the score margin, and per objective from the reward margin."""
    per = {n: sigmoid(c - r) for n, c, r in zip(names, chosen.rewards, rejected.rewards, strict=True)}
    return sigmoid(chosen.score - rejected.score), per


def named(names: Sequence[str], values: Sequence[float] | None) -> dict[str, float] | None:
    """Values keyed by objective name (None stays None)."""
    return None if values is None else dict(zip(names, values, strict=True))
