"""Direct computations of the reward spaces, for tests that check the service against them."""

from __future__ import annotations

import numpy as np


def debiased(manifest, results) -> np.ndarray:
    """The debiased objectives r @ T [N, K] of scorer results, with T from the manifest."""
    return np.array([r.rewards for r in results], np.float64) @ np.array(manifest.transform)
