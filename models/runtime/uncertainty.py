"""Uncertainty arithmetic shared by training (conformal multipliers) and post-processing (intervals).

A head's graph output is its epistemic standard deviation σe (the posterior of the head's weights). The
predictive one adds the label noise the head leaves: σp² = σe² + s². Split-conformal calibration makes
intervals honest: on n calibration rows the head did not fit (whole prompts held out, see
`polyreward.training.stage1.with_conformal_scores`), with scores e_i = |y_i − ŷ_i| / σp_i, the
multiplier for level l is the ⌈(n+1)·l⌉-th smallest e_i, and ŷ ± q(l)·σp covers a new rating with
probability ≥ l (exchangeability). Multipliers are stored for l = 0.01 … 0.99 (`CONFORMAL_LEVELS`); a level
in between uses the next stored one above it, so it stays conservative.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from polyreward.models.runtime.manifest import CONFORMAL_LEVELS

MIN_CONFORMAL_ROWS = 19  # the fewest rows that give a guaranteed multiplier at l = 0.95


def conformal_multipliers(scores: np.ndarray) -> list[float] | None:
    """The split-conformal multiplier for every stored level, from nonconformity scores |y − ŷ| / σp. Levels
    above n / (n + 1) would need an infinite multiplier; they get the largest score (not guaranteed)."""
    s = np.sort(np.asarray(scores, np.float64))
    if len(s) < MIN_CONFORMAL_ROWS:
        return None
    return [float(s[min(math.ceil((len(s) + 1) * level - 1e-9), len(s)) - 1]) for level in CONFORMAL_LEVELS]


def stored_level(level: float) -> int:
    """Index of the smallest stored level ≥ `level` (levels outside [0.01, 0.99] are refused before this)."""
    return next(i for i, stored in enumerate(CONFORMAL_LEVELS) if stored >= level - 1e-9)


def normal_quantile(level: float) -> float:
    """z with P(|N(0,1)| ≤ z) = level: the Gaussian interval's half-width in standard deviations."""
    return NormalDist().inv_cdf(0.5 + level / 2)
